"""The VAE lab's outputs: ``report.html`` (one self-contained file: tables, an SVG chart per metric, and per image
side-by-side crops with error heat maps, all images embedded as PNG data URIs), ``results.csv`` (one row per image
and setting), ``summary.csv`` (mean ± std per setting) and ``results.json`` (everything). Written atomically.

:func:`make_panels` makes an image's pictures while its outputs are in memory (called by :func:`vae_core.lab.run_lab`):
a crop of up to 256 px — where the round trips differ most from their references (a seam, an fp16 artefact), or
from the original when no reference differs — of the original and every round trip, ``|round trip − original|``
× :data:`GAIN_ORIGINAL` and ``|run − its reference|`` × :data:`GAIN_REFERENCE` for tiled and half-precision runs,
plus a thumbnail of that last heat map over the whole image (max-pooled, so a one-pixel seam stays visible).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import metrics
from ..io.atomic import atomic_write
from .run import METRICS, LabResult, Setting, _mean_std, aggregate

__all__ = ["make_panels", "write_report", "render_html", "GAIN_ORIGINAL", "GAIN_REFERENCE", "CROP", "THUMB"]

GAIN_ORIGINAL = 4.0
GAIN_REFERENCE = 16.0
CROP = 256
THUMB = 320
_COLOURS = ("#3b6fb6", "#d1603d", "#4d9a5a", "#8e5bb5", "#c49a1a", "#3aa3a3", "#b5486e", "#6b6b6b")


def _png(img: torch.Tensor) -> bytes:
    """``[3, H, W]`` in [0, 1] → PNG bytes."""
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _crop_box(x01: torch.Tensor, outputs: dict[Setting, torch.Tensor], refs: dict[Setting, dict[str, Setting]]
              ) -> tuple[int, int, int]:
    h, w = x01.shape[-2:]
    size = min(CROP, h, w)
    ref_err = [(outputs[s] - outputs[r]).abs().mean(0) for s, kinds in refs.items() for r in kinds.values()]
    score = sum(ref_err) if ref_err and any(float(e.max()) >= 0.5 / 255 for e in ref_err) else \
        sum((o - x01).abs().mean(0) for s, o in outputs.items() if s in refs)
    if not isinstance(score, torch.Tensor) or (size == h and size == w):
        return (h - size) // 2, (w - size) // 2, size
    stride = max(1, size // 4)
    score = torch.nan_to_num(score.double(), nan=1.0)
    ii = F.pad(score.cumsum(0).cumsum(1), (1, 0, 1, 0))  # integral image: any window's sum in four reads
    ys = sorted(set(range(0, h - size + 1, stride)) | {h - size})  # the last window reaches the bottom/right edge
    xs = sorted(set(range(0, w - size + 1, stride)) | {w - size})
    yt, xt = torch.tensor(ys), torch.tensor(xs)
    sums = ii[yt + size][:, xt + size] - ii[yt][:, xt + size] - ii[yt + size][:, xt] + ii[yt][:, xt]
    i = int(sums.flatten().argmax())
    return ys[i // len(xs)], xs[i % len(xs)], size


def make_panels(name: str, x01: torch.Tensor, outputs: dict[Setting, torch.Tensor],
                refs: dict[Setting, dict[str, Setting]]) -> dict[str, Any]:
    """The pictures of one image (see the module docstring). ``x01``/``outputs`` are ``[3, H, W]`` in [0, 1];
    ``refs`` maps each requested setting to its references. Returns PNG bytes keyed by setting label."""
    y0, x0, size = _crop_box(x01, outputs, refs)

    def crop(t: torch.Tensor) -> torch.Tensor:
        return t[:, y0:y0 + size, x0:x0 + size]

    out: dict[str, Any] = {"box": [x0, y0, size], "original": _png(crop(x01)), "runs": {}}
    h, w = x01.shape[-2:]
    k = max(1, math.ceil(max(h, w) / THUMB))
    for s, kinds in refs.items():
        y = outputs[s]
        run: dict[str, Any] = {"crop": _png(crop(y)), "heat": _png(metrics.heatmap(crop(x01), crop(y), GAIN_ORIGINAL)),
                               "ref": {}}
        for kind, r in kinds.items():
            err = (y - outputs[r]).abs().max(0, keepdim=True).values
            thumb = F.max_pool2d(err[None].float(), k, ceil_mode=True)[0] if k > 1 else err
            zeros = torch.zeros_like(thumb)
            run["ref"][kind] = {"crop": _png(metrics.heatmap(crop(y), crop(outputs[r]), GAIN_REFERENCE)),
                                "thumb": _png(metrics.heatmap(thumb, zeros, GAIN_REFERENCE))}
        out["runs"][s.label] = run
    return out


# -- formatting ------------------------------------------------------------------------------------------------
def _num(v: Optional[float], key: str) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    if math.isnan(v):
        return "nan"
    if key == "peak_bytes":
        return f"{v / 2**20:.0f}"
    if key == "seconds":
        return f"{v:.3f}"
    if key == "seam_vs_untiled":
        return f"{v:.0f}"
    if key in ("ssim", "ms_ssim", "lpips"):
        return f"{v:.4f}"
    return f"{v:.2f}"


def _ms(stat: Optional[tuple[float, float, int, int]], key: str, images: Optional[int] = None) -> str:
    """``mean ± std`` of an aggregate (:func:`vae_core.lab.aggregate`), with ``+k identical`` when some images gave
    ``inf`` and ``(n of N)`` when the metric exists for fewer than the ``images`` run."""
    if stat is None:
        return "-"
    m, s, n, identical = stat
    text = _num(m, key) if math.isinf(m) or s == 0 or math.isnan(s) else f"{_num(m, key)} ± {_num(s, key)}"
    if identical and not math.isinf(m):
        text += f" (+{identical} identical)"
    if images is not None and n < images:
        text += f" ({n} of {images} images)"
    return text


def _used(result: LabResult, key: str) -> bool:
    return any(r.values.get(key) is not None for r in result.runs if r.setting in result.requested)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return v


def as_json(result: LabResult) -> dict[str, Any]:
    """``results.json``'s content: machine, VAEs, images, settings (with ``requested``), runs and the summary;
    ``inf``/``nan`` as strings (JSON has no such numbers)."""
    def setting(s: Setting) -> dict[str, Any]:
        return {"label": s.label, "vae": s.vae, "dtype": s.dtype, "tile": s.tile, "mode": s.mode,
                "requested": s in result.requested}

    return {
        "machine": result.machine, "vaes": result.vaes, "images": result.images, "notes": result.notes,
        "settings": [setting(s) for s in result.settings],
        "runs": [{"image": r.image, "setting": r.setting.label, "ran_as": r.ran_as, "tiles": r.tiles,
                  "max_diff_255": r.max_diff_255, **{k: _json_value(v) for k, v in r.values.items()}}
                 for r in result.runs],
        "summary": [{"setting": row["setting"].label, "images": row["images"], "ran_as": row["ran_as"],
                     "max_diff_255": row["max_diff_255"],
                     **{k: None if row[k] is None else {"mean": _json_value(row[k][0]), "std": _json_value(row[k][1]),
                                                        "n": row[k][2], "identical": row[k][3]}
                        for k, *_ in METRICS}} for row in aggregate(result)],
    }


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def results_csv(result: LabResult) -> str:
    keys = [k for k, *_ in METRICS]
    rows: list[list[Any]] = [["image", "vae", "dtype", "tile", "mode", "requested", "ran_as", "tiles", *keys,
                              "max_diff_255_vs_untiled", "max_diff_255_vs_fp32"]]
    for r in result.runs:
        s = r.setting
        rows.append([r.image, s.vae, s.dtype, s.tile or "", s.mode, s in result.requested, r.ran_as, r.tiles,
                     *[_json_value(r.values[k]) if r.values[k] is not None else "" for k in keys],
                     *[("not finite" if r.max_diff_255[k] is None else r.max_diff_255[k]) if k in r.max_diff_255
                       else "" for k in ("untiled", "fp32")]])
    return _csv(rows)


def summary_csv(result: LabResult) -> str:
    keys = [k for k, *_ in METRICS]
    rows: list[list[Any]] = [["vae", "dtype", "tile", "mode", "images", "ran_as",
                              *[f"{k}_{m}" for k in keys for m in ("mean", "std", "n", "identical")]]]
    for row in aggregate(result):
        s = row["setting"]
        vals = []
        for k in keys:
            vals += ["", "", 0, 0] if row[k] is None else [_json_value(row[k][0]), _json_value(row[k][1]), row[k][2],
                                                           row[k][3]]
        rows.append([s.vae, s.dtype, s.tile or "", s.mode, row["images"], "; ".join(row["ran_as"]), *vals])
    return _csv(rows)


# -- HTML ------------------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#555;margin-bottom:12px}table{border-collapse:collapse;margin:6px 0 12px}
th,td{border:1px solid #d6d6d6;padding:2px 6px;text-align:right;white-space:nowrap;font-size:13px}
th{background:#f2f2f2}td.l,th.l{text-align:left}tr.warn td{background:#fff4e5}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #e2e2e2;padding:6px}
.grid{display:grid;gap:8px;align-items:start}.cell{font-size:12px;text-align:center}
.cell img{display:block;image-rendering:pixelated;border:1px solid #ccc;margin:0 auto 2px}
.rowlabel{font-size:12px;font-weight:600;align-self:center;text-align:right}
.note{color:#555;font-size:12px}
"""


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _chart(rows: list[dict[str, Any]], key: str, label: str, unit: str, higher: bool, colours: dict[str, str]) -> str:
    """A horizontal bar chart (SVG) of one metric's means with ±std whiskers; inf is drawn as a full bar."""
    vals = [(row["setting"], row[key]) for row in rows if row[key] is not None]
    if not vals:
        return ""
    scale = 1 / 2**20 if key == "peak_bytes" else 1.0
    finite = [(m + (s if math.isfinite(s) else 0)) * scale for _, (m, s, *_) in vals if math.isfinite(m)]
    top = max(finite) if finite else 1.0
    top = top * 1.05 if top > 0 else 1.0
    lw, bw, bh = 250, 200, 16
    height = 30 + (bh + 5) * len(vals)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{lw + bw + 80}" height="{height}" role="img" '
             f'aria-label="{html.escape(label)}">',
             f'<text x="4" y="16" font-size="13" font-weight="600">{html.escape(label)}'
             f'{" (" + unit + ")" if unit else ""} — {"higher" if higher else "lower"} is better</text>']
    for i, (s, (m, sd, _, identical)) in enumerate(vals):
        y = 28 + i * (bh + 5)
        inf = math.isinf(m)
        length = bw if inf else 0.0 if math.isnan(m) else max(0.0, m * scale / top * bw)
        parts.append(f'<text x="{lw - 6}" y="{y + 12}" font-size="11" text-anchor="end">{html.escape(s.label)}</text>')
        parts.append(f'<rect x="{lw}" y="{y}" width="{length:.1f}" height="{bh}" fill="{colours[s.vae]}"'
                     f'{" fill-opacity=0.45" if inf else ""}/>')
        if math.isfinite(m) and math.isfinite(sd) and sd > 0:
            a, b = (m - sd) * scale / top * bw, (m + sd) * scale / top * bw
            parts.append(f'<line x1="{lw + max(0, a):.1f}" x2="{lw + b:.1f}" y1="{y + bh / 2}" y2="{y + bh / 2}" '
                         'stroke="#111" stroke-width="1.5"/>')
        text = "∞ (identical)" if inf else _num(m, key) + (f" (+{identical} identical)" if identical else "")
        parts.append(f'<text x="{lw + length + 4:.1f}" y="{y + 12}" font-size="11">{text}</text>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + "</div>"


def _table(result: LabResult, rows: list[dict[str, Any]]) -> str:
    keys = [(k, lab, unit) for k, lab, unit, _ in METRICS if _used(result, k)]
    head = "".join(f"<th>{html.escape(lab)}{' (' + unit + ')' if unit else ''}</th>" for _, lab, unit in keys)
    out = [f'<table><tr><th class="l">setting</th><th class="l">ran as</th><th>images</th>{head}</tr>']
    for row in rows:
        s = row["setting"]
        fell_back = any(r != s.dtype.replace("fp16-fix", "fp16") for r in row["ran_as"])
        cells = []
        for k, *_ in keys:
            text = html.escape(_ms(row[k], k, row["images"]))
            kind = k.removeprefix("psnr_vs_")
            if kind in row["max_diff_255"]:
                diff = row["max_diff_255"][kind]
                text += f"<br><span class=note>max {'(not finite)' if diff is None else f'{diff}/255'}</span>"
            cells.append(f"<td>{text}</td>")
        out.append(f'<tr{" class=warn" if fell_back else ""}><td class="l">{html.escape(s.label)}</td>'
                   f'<td class="l">{html.escape(", ".join(row["ran_as"]))}</td><td>{row["images"]}</td>'
                   + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _image_section(result: LabResult, im: dict[str, Any]) -> str:
    name = im["name"]
    per = [r for r in result.runs if r.image == name and r.setting in result.requested]
    rows = [{"setting": r.setting, "images": 1, "ran_as": [r.ran_as], "max_diff_255": r.max_diff_255,
             **{k: _mean_std([r.values[k]]) for k, *_ in METRICS}} for r in per]
    clip = (f", {im['frames']} frames (pictures: frame {im.get('frame_shown', 0)}, where the round trips differ most "
            "from the original)") if "frames" in im else ""
    parts = [f"<h2>{html.escape(name)}</h2><div class=meta>{html.escape(im['path'])}: {im['width']}×{im['height']} px "
             f"as run{clip}</div>", _table(result, rows)]
    panel = result.panels.get(name)
    if panel:
        x0, y0, size = panel["box"]
        runs = [r.setting for r in per]
        kinds = [k for k in ("untiled", "fp32") if any(k in panel["runs"][s.label]["ref"] for s in runs)]
        heads = ["round trip", f"|diff| vs original ×{GAIN_ORIGINAL:g}",
                 *[f"|diff| vs {k} ×{GAIN_REFERENCE:g}" for k in kinds]]
        parts.append(f"<h3>Crop {size}×{size} at ({x0}, {y0})</h3>"
                     f'<div class=grid style="grid-template-columns:220px repeat({len(heads)},{size + 4}px)">'
                     "<div></div>" + "".join(f"<div class=cell><b>{html.escape(h)}</b></div>" for h in heads))

        def cell(png: Optional[bytes], caption: str) -> str:
            if png is None:
                return "<div class=cell></div>"
            return (f'<div class=cell><img src="{_uri(png)}" width="{size}" height="{size}" '
                    f'alt="{html.escape(caption)}"></div>')

        parts.append("<div class=rowlabel>original</div>" + cell(panel["original"], "original")
                     + "<div class=cell></div>" * (len(heads) - 1))
        for s in runs:
            run = panel["runs"][s.label]
            parts.append(f"<div class=rowlabel>{html.escape(s.label)}</div>" + cell(run["crop"], s.label)
                         + cell(run["heat"], f"{s.label} vs original")
                         + "".join(cell(run["ref"].get(k, {}).get("crop"), f"{s.label} vs {k}") for k in kinds))
        parts.append("</div>")
        thumbs = [(s, kind, ref["thumb"]) for s in runs for kind, ref in panel["runs"][s.label]["ref"].items()]
        if thumbs:
            parts.append(f"<h3>Whole image: |diff| vs reference ×{GAIN_REFERENCE:g} (max-pooled)</h3><div class=charts>")
            for s, kind, png in thumbs:
                parts.append(f'<div class=cell><img src="{_uri(png)}" alt="{html.escape(s.label)} vs {kind}">'
                             f"{html.escape(s.label)} vs {kind}</div>")
            parts.append("</div>")
    return "".join(parts)


def render_html(result: LabResult, command: str = "") -> str:
    """The whole report as one HTML string (no external resources)."""
    rows = aggregate(result)
    vaes = sorted({s.vae for s in result.settings})
    colours = {v: _COLOURS[i % len(_COLOURS)] for i, v in enumerate(vaes)}
    m = result.machine
    charts = "".join(_chart(rows, k, lab, unit, hi, colours) for k, lab, unit, hi in METRICS if _used(result, k))
    vae_list = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in result.vaes.items())
    body = [f"<h1>VAE lab report</h1><div class=meta>{len(result.images)} image(s), {len(rows)} setting(s); "
            f"{html.escape(m['device'])}; torch {html.escape(m['torch'])}; {html.escape(m['date'])}"
            + (f"<br><code>{html.escape(command)}</code>" if command else "") + f"</div><ul>{vae_list}</ul>"
            + "".join(f"<p class=note>{html.escape(n)}</p>" for n in result.notes),
            "<h2>Summary (mean ± std over the images)</h2>", _table(result, rows),
            "<p class=note>PSNR, SSIM and MS-SSIM against the original on [0, 1] (SSIM: 11-px Gaussian window, "
            "σ 1.5; MS-SSIM needs images over 160 px). “vs untiled”: the same VAE and dtype untiled; “vs fp32”: "
            "the same VAE and tiling in fp32; max n/255: the largest pixel difference after 8-bit rounding. "
            "“ran as” differs from the dtype (highlighted) when the NaN guard re-ran a call in a wider dtype. "
            "Time is the encode + decode wall time; memory the call's peak above its start.</p>",
            f"<div class=charts>{charts}</div>"]
    body += [_image_section(result, im) for im in result.images]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>VAE lab report</title>"
            f"<style>{_CSS}</style></head><body>" + "".join(body) + "</body></html>")


def write_report(result: LabResult, out_dir: Path, command: str = "") -> dict[str, Path]:
    """Write ``report.html``, ``results.csv``, ``summary.csv`` and ``results.json`` into ``out_dir`` (created),
    each atomically. Returns their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {"html": ("report.html", render_html(result, command)), "csv": ("results.csv", results_csv(result)),
             "summary": ("summary.csv", summary_csv(result)),
             "json": ("results.json", json.dumps(as_json(result), indent=1, allow_nan=False))}
    paths = {}
    for kind, (name, text) in texts.items():
        paths[kind] = atomic_write(out_dir / name, lambda tmp, t=text: tmp.write_text(t, encoding="utf-8"))
    return paths

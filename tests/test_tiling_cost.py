"""Exact tiling costs about what untiled costs: FLOP ratios counted with torch.utils.flop_counter on the meta device
(deterministic, no data needed: FLOPs do not depend on weight values), for the trained fixture's shape and SD's."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vae_core import engine, tiling
from vae_core.families.kl.model import AutoencoderKL, ModelConfig

FIXTURE = ModelConfig(ch=32, ch_mult=(1, 2, 4, 4))  # tests/fixtures/mini-vae: SD's topology at 1/4 width
SD = ModelConfig()


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def flop_ratio(cfg: ModelConfig, op: str, size: int, tile: int, cache_bytes: object = None,
               report: tiling.TileReport | None = None, mode: str = "exact") -> float:
    """FLOPs of the tiled call over FLOPs of the untiled call, on the meta device. ``cache_bytes`` None: what the
    plan needs for full speed (:func:`vae_core.engine.cache_needed`)."""
    with torch.device("meta"):
        model = AutoencoderKL(cfg).eval().requires_grad_(False)
    f = cfg.downscale
    if cache_bytes is None:
        cache_bytes = engine.cache_needed(model, op, size, size, tile)
    opts = tiling.TileOptions(tile=tile, mode=mode, cache_bytes=cache_bytes, report=report)
    with torch.no_grad():
        if op == "decode":
            x = torch.empty(1, cfg.latent_channels, size // f, size // f, device="meta")
            return _flops(lambda: engine.decode(model, x, opts)) / _flops(lambda: model.decode(x))
        x = torch.empty(1, 3, size, size, device="meta")
        return _flops(lambda: engine.encode(model, x, opts)) / _flops(lambda: model.encode(x))


def near(ratio: float, measured: float) -> bool:
    """``ratio`` within 10 % of the overhead measured when the figure was recorded (BENCHMARKS.md), plus 0.002 for
    the rounding of the recorded figure: a change that makes tiling 10 % more (or less) wasteful fails."""
    return abs(ratio - measured) <= 0.1 * (measured - 1.0) + 0.002


#: FLOPs of exact tiling over untiled (with the cache it needs for full speed), as measured and recorded.
MEASURED = {("fixture-1024-256", "decode"): 1.0710, ("fixture-1024-256", "encode"): 1.0260,
            ("fixture-2048-512", "decode"): 1.0230, ("fixture-2048-512", "encode"): 1.0070,
            ("sd-512-256", "decode"): 1.0560, ("sd-512-256", "encode"): 1.0250}


@pytest.mark.parametrize("op", ["decode", "encode"])
@pytest.mark.parametrize("cfg,size,tile,case", [(FIXTURE, 1024, 256, "fixture-1024-256"),
                                                (FIXTURE, 2048, 512, "fixture-2048-512"), (SD, 512, 256, "sd-512-256")],
                         ids=["fixture-1024-256", "fixture-2048-512", "sd-512-256"])
def test_exact_flop_ratio(op, cfg, size, tile, case):
    report = tiling.TileReport()
    ratio = flop_ratio(cfg, op, size, tile, report=report)
    assert near(ratio, MEASURED[case, op]), (ratio, MEASURED[case, op])
    assert report.recomputed_runs == 0 and report.flops_recompute == 0
    assert report.schedule == "level-major" and report.tiles == (size // tile) ** 2


def test_smaller_budgets_cost_more_but_degrade_gradually():
    """Half the full-speed cache costs 1.35×, none at all 10.7× (recomputing: the exact result, slowest)."""
    with torch.device("meta"):
        model = AutoencoderKL(FIXTURE)
    need = engine.cache_needed(model, "decode", 1024, 1024, 256)
    full, half, none = (flop_ratio(FIXTURE, "decode", 1024, 256, c) for c in (need, need // 2, 0))
    assert near(full, 1.0710) and near(half, 1.3496) and near(none, 10.708), (full, half, none)


def test_fast_mode_is_no_cheaper_than_exact():
    """The reason exact is the default: with its cache it computes less than fast mode's proxy + one sweep."""
    fast = flop_ratio(FIXTURE, "decode", 1024, 256, mode="fast")
    assert flop_ratio(FIXTURE, "decode", 1024, 256) < fast and near(fast, 1.2087), fast


def test_report_accounts_for_the_tiled_flops():
    """The engine's own FLOP accounting (convs of the tiled stages) agrees with the FLOP counter's extra FLOPs."""
    report = tiling.TileReport()
    ratio = flop_ratio(FIXTURE, "decode", 512, 128, 0, report)
    with torch.device("meta"):
        model = AutoencoderKL(FIXTURE)
    z = torch.empty(1, 4, 64, 64, device="meta")
    with torch.no_grad():
        untiled = _flops(lambda: model.decode(z))
    extra = (ratio - 1) * untiled
    assert report.flops_halo + report.flops_recompute == pytest.approx(extra, rel=0.01)


def test_cache_needed_scales_with_area():
    with torch.device("meta"):
        model = AutoencoderKL(FIXTURE)
    a, b = (engine.cache_needed(model, "decode", s, s, 256) for s in (1024, 2048))
    assert 3.5 < b / a < 4.5
    assert engine.cache_needed(model, "decode", 256, 256, 256) == 0
    with pytest.raises(ValueError, match="op="):
        engine.cache_needed(model, "roundtrip", 256, 256, 64)


WAN_CONFIGS = {"2.1": dict(), "2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, residual=True, patch=2)}
#: the tiled/untiled FLOP ratios BENCHMARKS.md reports for Wan at 1280×720 (81 frames) plus 2 %, (256, 512)-px tiles:
#: tile-major (least memory) and level-major (what runs when the cache budget holds the frame's causal states)
WAN_BOUNDS = {("2.1", "decode"): {"tile": (1.25, 1.13), "level": (1.05, 1.03)},
              ("2.1", "encode"): {"tile": (1.40, 1.20), "level": (1.05, 1.03)},
              ("2.2", "decode"): {"tile": (1.52, 1.25), "level": (1.06, 1.03)},
              ("2.2", "encode"): {"tile": (2.03, 1.48), "level": (1.08, 1.03)}}
#: the issue's target for the level-major schedule at 1280×720 with 256- and 512-px tiles
WAN_TARGET = 1.15


@pytest.mark.parametrize("version,op", list(WAN_BOUNDS))
def test_wan_video_tiling_cost_at_real_widths(version, op):
    """Exact streamed tiling of a 1280×720 clip (9 frames; the ratio is per frame) at Wan's real widths, counted on
    the meta device: at most the bounds recorded in BENCHMARKS.md for 256- and 512-px tiles in both schedules, more
    than the untiled call (halos are recomputed), cheaper with the larger tile, level-major within the target and
    cheaper than tile-major."""
    from vae_core.families.wan.model import WanConfig
    from vae_core.lab.bench_video import video_flop_ratio

    cfg = WanConfig(**WAN_CONFIGS[version])
    got = {sch: [video_flop_ratio(cfg, op, 9, 720, 1280, tile, sch) for tile in (256, 512)]
           for sch in ("tile", "level")}
    for sch, (r256, r512) in got.items():
        b256, b512 = WAN_BOUNDS[(version, op)][sch]
        assert 1.0 < r512 < r256, (sch, r256, r512)
        assert r256 <= b256 and r512 <= b512, (sch, r256, r512)
    assert max(got["level"]) <= WAN_TARGET and all(a < b for a, b in zip(got["level"], got["tile"])), got


#: HunyuanVideo 1.5 at its real widths (128..1024, 32 latent channels), 1280×720, (256, 512)-px tiles: the ratios
#: BENCHMARKS.md reports (121 frames) plus 2 %; the issue's target is ≤ 1.2× with 512-px tiles
HV15_BOUNDS = {"decode": {"tile": (1.55, 1.26), "level": (1.06, 1.03)},
               "encode": {"tile": (2.06, 1.49), "level": (1.06, 1.03)}}


@pytest.mark.parametrize("op", list(HV15_BOUNDS))
def test_hv15_video_tiling_cost_at_real_widths(op):
    """As for Wan (5 frames: the ratio is per frame): both schedules within their recorded bounds, level-major
    within the issue's 1.2× at 512 px and cheaper than tile-major."""
    from vae_core.families.hv15.model import HV15Config
    from vae_core.lab.bench_video import video_flop_ratio

    got = {sch: [video_flop_ratio(HV15Config(), op, 5, 720, 1280, tile, sch) for tile in (256, 512)]
           for sch in ("tile", "level")}
    for sch, (r256, r512) in got.items():
        b256, b512 = HV15_BOUNDS[op][sch]
        assert 1.0 < r512 < r256 and r256 <= b256 and r512 <= b512, (sch, r256, r512)
    assert got["level"][1] <= 1.2 and all(a < b for a, b in zip(got["level"], got["tile"])), got


#: LTX-Video at its released widths (0.9.1 and 0.9.5 decoders; 0.9.x encoders), 1280×704 (720 is not a multiple of
#: 32), 17 frames, (256, 512)-px tiles: the ratios BENCHMARKS.md reports plus 2 %; tile-major recomputes the deep
#: chains' wide halos (the low-memory fallback), level-major is what a call with the memory for it runs
LTX_BOUNDS = {("0.9.1", "decode"): {"tile": (4.23, 2.32), "level": (1.06, 1.03)},
              ("0.9.5", "decode"): {"tile": (3.36, 2.00), "level": (1.06, 1.03)},
              ("0.9.1", "encode"): {"tile": (13.1, 5.50), "level": (1.06, 1.03)},
              ("0.9.5", "encode"): {"tile": (8.40, 4.11), "level": (1.05, 1.03)}}


@pytest.mark.parametrize("version,op", list(LTX_BOUNDS))
def test_ltx_video_tiling_cost_at_real_widths(version, op):
    """As for Wan: both schedules within their recorded bounds, more than untiled, cheaper with the larger tile;
    level-major within the issue's 1.2× at 512 px and cheaper than tile-major."""
    from vae_core.families.ltx.model import release_config
    from vae_core.lab.bench_video import video_flop_ratio

    cfg = release_config(version)
    got = {sch: [video_flop_ratio(cfg, op, 17, 704, 1280, tile, sch) for tile in (256, 512)]
           for sch in ("tile", "level")}
    for sch, (r256, r512) in got.items():
        b256, b512 = LTX_BOUNDS[(version, op)][sch]
        assert 1.0 < r512 < r256 and r256 <= b256 and r512 <= b512, (sch, r256, r512)
    assert got["level"][1] <= 1.2 and all(a < b for a, b in zip(got["level"], got["tile"])), got


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_hv10_video_tiling_cost_at_real_widths(op):
    """HunyuanVideo 1.0 at its released widths, 1280×720 (9 frames: the ratio does not depend on the count), 256- and
    512-px tiles: op by op, each conv runs valid over exactly its output piece (halos are read, never computed), so
    the tiled call counts the untiled FLOPs exactly (BENCHMARKS.md: 1.000 at 121 frames too), the chunked schedule's
    too."""
    from vae_core.families.hv10.model import HV10Config
    from vae_core.lab.bench_video import video_flop_ratio

    for tile in (256, 512):
        assert video_flop_ratio(HV10Config(), op, 9, 720, 1280, tile) == pytest.approx(1.0, abs=1e-9)
    # newer ComfyUI's chunked schedule, against its own untiled network: 17 frames, 3 chunks each way
    assert video_flop_ratio(HV10Config(chunked=True), op, 17, 720, 1280, 512) == pytest.approx(1.0, abs=1e-9)

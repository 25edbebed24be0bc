"""The layout of vae_core, read from the source with ``ast``: the import graph has no cycle (modules, and subpackages
as units), nothing in vae_core imports a host, and every family is one folder in the registry."""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "vae_core"
HOSTS = {"comfy", "comfy_extras", "folder_paths", "nodes", "modules", "gradio", "webui_extension", "server",
         "execution", "backend"}  # ComfyUI, A1111 and Forge top-level modules


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(vae_core modules ``name`` imports, anywhere in the file; top-level names of the other imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner, outer = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "vae_core":
                    inner.add(alias.name)
                else:
                    outer.add(top)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module.split(".")[0] != "vae_core":
                    outer.add(node.module.split(".")[0])
                    continue
                base = node.module
            else:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import tiling` names a module; `from .x import y` a name in x
                inner.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    inner.discard(name)
    unknown = inner - set(modules)
    assert not unknown, f"{name} imports {unknown}, which are not vae_core modules"
    return inner, outer


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    graph, outside = {}, {}
    for name, path in modules.items():
        graph[name], outside[name] = _imports(name, path, modules)
    return graph, outside


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of ``graph`` as a list of nodes, or [] (iterative DFS, three colours)."""
    colour, stack_path = {n: 0 for n in graph}, []
    for start in graph:
        if colour[start]:
            continue
        todo = [(start, iter(sorted(graph[start])))]
        colour[start], stack_path = 1, [start]
        while todo:
            node, children = todo[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                todo.pop()
                stack_path.pop()
            elif colour.get(child, 2) == 1:
                return stack_path[stack_path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                stack_path.append(child)
                todo.append((child, iter(sorted(graph[child]))))
    return []


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_import_graph_has_no_cycle():
    graph, _ = _graph()
    assert len(graph) > 40  # the whole package was read
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def _unit(module: str) -> str:
    """A module's unit: its subpackage (``vae_core.families``, ``vae_core.tiling``) or the top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_subpackages_are_layers():
    """Taken as units (``io``, ``tiling``, ``precision``, ``families``, ``hosts``, ``lab``, ``cli`` and the
    top-level modules) the graph has no cycle either, so each subpackage sits on the ones below it."""
    graph, _ = _graph()
    units: dict[str, set[str]] = {}
    for name, deps in graph.items():
        if name == "vae_core":  # the package's public re-exports sit on top of everything
            continue
        units.setdefault(_unit(name), set()).update(_unit(d) for d in deps if _unit(d) != _unit(name))
    units = {u: {d for d in ds if d in units} for u, ds in units.items()}
    assert _cycle(units) == [], " -> ".join(_cycle(units))
    below_hosts = [u for u in units if u not in ("vae_core.hosts", "vae_core.lab", "vae_core.cli", "vae_core.__main__")]
    assert all("vae_core.hosts" not in units[u] for u in below_hosts), {u: units[u] for u in below_hosts}


def test_no_module_imports_a_host():
    _, outside = _graph()
    offending = {name: sorted(mods & HOSTS) for name, mods in outside.items() if mods & HOSTS}
    assert offending == {}


@pytest.mark.parametrize("family", ["kl", "wan", "hv15", "tiny"])
def test_each_family_is_one_folder_in_the_registry(family):
    """A family's network, conversion and plan live in its folder, and only the registry names the folders."""
    from vae_core.families.registry import REGISTRY

    assert family in {f.name for f in REGISTRY}
    assert {"model.py", "convert.py", "family.py"} <= {p.name for p in (ROOT / "families" / family).iterdir()}
    graph, _ = _graph()
    users = {name for name, deps in graph.items() if any(d.startswith(f"vae_core.families.{family}") for d in deps)}
    outside = {u for u in users if not u.startswith(f"vae_core.families.{family}")}
    # kl is also the pack's reference network: the public API re-exports it, the model-level engine exposes its
    # decoder/encoder-only forwards (A1111 hooks those), the loader reads AutoencoderKLs for A1111's own VAE, and the
    # benchmark's default model and its diffusers peer are AutoencoderKLs
    kl_users = {"vae_core.engine", "vae_core.loading", "vae_core.cli.bench", "vae_core.lab.bench"}
    allowed = {"vae_core.families.registry", "vae_core"} | (kl_users if family == "kl" else set())
    assert outside <= allowed, outside - allowed


def test_no_network_type_dispatch_outside_the_families():
    """Loading, Vae, the host engine, the CLI, bench and the lab ask the family: no ``isinstance`` on a family's
    network class and no ``hasattr`` probing of models outside ``families/``."""
    names = {"AutoencoderKL", "WanVAE", "HV15VAE", "TinyAutoencoder"}
    found = []
    for path in itertools.chain(ROOT.glob("*.py"), *(ROOT.glob(f"{d}/*.py") for d in ("hosts", "lab", "cli", "io"))):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance",
                                                                                                  "hasattr"):
                text = ast.unparse(node)
                if node.func.id == "isinstance" and any(n in text for n in names) or \
                        node.func.id == "hasattr" and "model" in text:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    assert found == []

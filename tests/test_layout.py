"""The package layout holds: imports run only downward through the layers, and no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lavise_core"

#: layer rank of each top-level part of lavise_core; a module may import only ranks <= its own
LAYERS = {
    "data": 0,
    "models": 1,
    "pipeline": 2,
    "explain": 3,
    "evaluate": 4,
    "api": 5,
    "stages": 5,
    "views": 6,
    "cli": 7,
    "__init__": 8,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def imports_of(path: Path) -> set[str]:
    """Every ``lavise_core`` module imported anywhere in the file (function-level imports included)."""
    out: set[str] = set()
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lavise_core")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("lavise_core"):
                out.add(mod)
                # ``from lavise_core.explain.textual import grounding``: the submodule is imported too
                folder = PACKAGE.parent.joinpath(*mod.split("."))
                out |= {f"{mod}.{a.name}" for a in node.names if (folder / f"{a.name}.py").is_file()}
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    for mod in graph():
        layer_of(mod)  # KeyError names a module outside the layers


def test_no_upward_imports() -> None:
    upward = [
        f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})"
        for mod, deps in graph().items()
        for dep in deps
        if dep != "lavise_core" and layer_of(dep) > layer_of(mod)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    graph_all = graph()
    g = {m: {d for d in deps if d in graph_all} for m, deps in graph_all.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(d) :], d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph_all):
        if m not in state:
            visit(m)


def family_of(module: str) -> str | None:
    """The method family of an ``explain`` module: its package (``lavise``) or single module (``ood``)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "explain" else None


def test_method_families_do_not_import_each_other() -> None:
    crossing = [
        f"{mod} imports {dep}"
        for mod, deps in graph().items()
        if family_of(mod)
        for dep in deps
        if family_of(dep) and family_of(dep) != family_of(mod)
    ]
    assert not crossing, "what two families share belongs in data/ or models/:\n" + "\n".join(crossing)


def test_explain_is_method_packages() -> None:
    flat = sorted(p.stem for p in (PACKAGE / "explain").glob("*.py") if p.stem != "__init__")
    assert flat == ["datamap", "ood", "oramas", "siam"]
    for pkg in ("attribution", "dissection", "featurevis", "lavise", "textual"):
        init = PACKAGE / "explain" / pkg / "__init__.py"
        tree = ast.parse(init.read_text(encoding="utf-8"))
        names = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__"]
        assert names, f"{init} names no public API (__all__)"


def private_imports(path: Path) -> list[str]:
    """``from lavise_core.X import _name`` anywhere in the file: another module's private name."""
    return [
        f"{node.module}.{a.name}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lavise_core")
        for a in node.names
        if a.name.startswith("_")
    ]


def test_no_module_imports_another_modules_private_name() -> None:
    roots = [PACKAGE, PACKAGE.parent / "app_pages", PACKAGE.parent / "bench"]
    found = [
        f"{p.name}: {name}"
        for root in roots
        for p in sorted(root.rglob("*.py"))
        for name in private_imports(p)
    ]
    assert not found, "\n".join(found)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    p = PACKAGE / "explain" / "textual" / "explainer.py"
    assert "lavise_core.pipeline.bundle" in imports_of(p) or "lavise_core.data.dataset" in imports_of(p)
    assert "lavise_core.explain.textual.grounding" in imports_of(PACKAGE / "stages.py")
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from lavise_core.views.home import _filter_labels\n")
    assert private_imports(fake) == ["lavise_core.views.home._filter_labels"]
    assert family_of("lavise_core.explain.lavise.head") == "lavise" and family_of("lavise_core.api") is None


def uses_argparse(path: Path) -> bool:
    """Whether the file imports ``argparse`` anywhere (``import argparse [as x]``, ``from argparse import``)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] == "argparse" for n in names):
            return True
    return False


def test_only_the_cli_imports_argparse(tmp_path: Path) -> None:
    """Command-line wiring lives in lavise_core/cli/; data, models, views and the rest never import argparse."""
    cli = PACKAGE / "cli"
    found = [
        str(p.relative_to(PACKAGE.parent))
        for p in sorted(PACKAGE.rglob("*.py"))
        if cli not in p.parents and uses_argparse(p)
    ]
    assert not found, "argparse outside lavise_core/cli/:\n" + "\n".join(found)
    assert uses_argparse(cli / "parser.py")
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from argparse import ArgumentParser\n")
    assert uses_argparse(fake)

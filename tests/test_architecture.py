"""The house rules of docs/architecture.md, checked on the source with the standard library's `ast`:
no import cycles among the modules of orchestrator/ and llip_core/ (module-level and function-level
imports alike), imports that run one way (CLI -> stages -> shared infrastructure -> llip_core), and a
llip_core that never imports ray, mlflow or orchestrator."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llip_core", "orchestrator")

# Floors, lowest first: a module may import its own floor or lower ones, never a higher one.
# Shared infrastructure sits above llip_core; stages sit above it, in the order data flows; the CLI
# dispatcher sits on top.
FLOORS = [
    ["llip_core"],
    ["orchestrator.errors", "orchestrator.console", "orchestrator.cluster"],
    ["orchestrator.config"],
    ["orchestrator.storage"],
    ["orchestrator.tracking"],
    ["orchestrator.data"],
    ["orchestrator.curation"],
    ["orchestrator.evaluation"],
    ["orchestrator.models"],
    ["orchestrator.training"],
    ["orchestrator.sweeps"],
    ["orchestrator.jobs"],
    ["orchestrator.cli", "orchestrator.__main__"],
]
# tracking's commands (compare, report) read what the stages logged, through MLflow only, so they
# sit with tracking and import no stage. models (export, import, the MLflow model) sits below training:
# the driver logs a finished run's model, and the sweep registers its best trial's.


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(p)] = p
    return out


def imported_names(path: Path, name: str) -> set[str]:
    """Every module this file imports, at any depth of the file (functions included), resolved to
    absolute dotted names; `from X import Y` yields X.Y when that is a module, else X."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    g = {}
    for name, path in mods.items():
        deps = set()
        for imp in imported_names(path, name):
            # the module itself, or the nearest enclosing package that is one of ours
            parts = imp.split(".")
            while parts and ".".join(parts) not in mods:
                parts.pop()
            if parts and ".".join(parts) != name:
                deps.add(".".join(parts))
        g[name] = deps
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None. Package __init__ edges count too."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in g}
    stack: list[str] = []

    def visit(n):
        colour[n] = GREY
        stack.append(n)
        for m in sorted(g[n]):
            if colour[m] == GREY:
                return stack[stack.index(m):] + [m]
            if colour[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = BLACK
        return None

    for n in sorted(g):
        if colour[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def floor_of(name: str) -> int:
    if name == "orchestrator":  # the empty top package (jobs reads its folder to ship it)
        return 0
    for i, prefixes in enumerate(FLOORS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name}: on no floor of docs/architecture.md; add its package to FLOORS here and there")


def files(cycle: list[str]) -> str:
    mods = all_modules()
    return " -> ".join(str(mods[m].relative_to(ROOT)) for m in cycle)


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, f"import cycle: {files(cycle)}"


def test_imports_run_one_way():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if floor_of(dep) > floor_of(name):
                wrong.append(f"{all_modules()[name].relative_to(ROOT)} imports {dep} (a higher floor)")
    assert not wrong, "\n".join(sorted(wrong))


def test_llip_core_imports_neither_ray_nor_mlflow_nor_orchestrator():
    bad = []
    for name, path in all_modules().items():
        if not name.startswith("llip_core"):
            continue
        for imp in imported_names(path, name):
            if imp.split(".")[0] in ("ray", "mlflow", "orchestrator"):
                bad.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not bad, "\n".join(sorted(set(bad)))


# -- the checker itself, on a made-up tree: it must see what it claims to see ----------------------
def test_the_cycle_finder_names_a_function_level_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "orchestrator"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from orchestrator.data import b\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "data" / "c.py").write_text("def g():\n    import orchestrator.data.a\n")
    (tmp_path / "llip_core").mkdir()
    (tmp_path / "llip_core" / "__init__.py").write_text("import ray\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    cycle = find_cycle(graph())
    assert cycle and set(cycle) == {"orchestrator.data.a", "orchestrator.data.b", "orchestrator.data.c"}
    assert "orchestrator/data/a.py" in files(cycle)
    with pytest.raises(AssertionError, match="llip_core/__init__.py imports ray"):
        test_llip_core_imports_neither_ray_nor_mlflow_nor_orchestrator()

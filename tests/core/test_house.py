"""The house's rules (docs/architecture.md), checked on every run of the suite: the import-linter layer
contract holds (imports inside functions included), no import cycle, no module importing another's
private names, no module over 500 lines, no test importing another test module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "cellmorph"


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC.parent).with_suffix("").parts): p for p in SRC.rglob("*.py")}


def _imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every cellmorph import in the file, inside functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "cellmorph"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "cellmorph":
                out.append((base, [a.name for a in node.names]))
    return out


def test_layers_hold_by_import_linter():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


def test_no_import_cycle_and_no_private_import_across_modules():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods if not m.endswith("__init__")}
    private = []
    for m, path in mods.items():
        for target, names in _imports(path, m):
            t = next((c for c in (target, f"{target}.__init__") if c in mods), None)
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            for n in names:
                if n.startswith("_") and not n.startswith("__") and t and t != m:
                    private.append(f"{m} <- {target}.{n}")
            for tgt in subs or ([t] if t else []):
                if tgt != m and not m.endswith("__init__") and not tgt.endswith("__init__"):
                    graph[m].add(tgt)
    assert private == []
    # a cycle exists iff a depth-first search meets a node on its own stack
    state: dict[str, int] = {}

    def visit(v: str, stack: list[str]) -> list[str] | None:
        state[v] = 1
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack + [v, w]
            if w not in state and (found := visit(w, stack + [v])):
                return found
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            assert visit(v, []) is None, "import cycle"


def test_no_module_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_no_test_imports_another_test_module():
    bad = []
    for p in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            for n in ([mod] if mod else []) + names:
                if n and ("conftest" in n or n.split(".")[-1].startswith("test_")):
                    bad.append(f"{p.relative_to(REPO)}: {n}")
    assert bad == []


@pytest.mark.parametrize("name", ["Classifier", "cross_validate", "run", "load_dataset", "predict_images", "ImageTable", "Metrics", "CVResult"])
def test_public_api_names_resolve(name):
    import cellmorph as cm

    assert getattr(cm, name).__doc__

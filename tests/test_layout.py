"""The house's rules, checked: no import loops, small files, a launcher that names no architecture,
``fit`` free of torch, and design notes that ship in ``docs/``."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("datapipe", "launcher", "zoo", "fit")
#: a file past this many lines is asking to be split (STYLE: "past ~400 lines")
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for path in (REPO / room).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → project modules it imports (at any depth of the file: lazy imports count too)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in names:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                found = visit(nxt)
                if found:
                    return found
        colour[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ importing its own submodules is not a loop of rooms; ignore parent links
    trimmed = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    assert find_cycle(trimmed) is None, f"import cycle: {' → '.join(find_cycle(trimmed))}"


def test_find_cycle_sees_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_files_are_small():
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_launcher_names_no_architecture():
    from zoo.registry import MODELS

    words = {name for name in MODELS} | {"eSEN", "GemNet", "EGNN", "MPNN"}
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words)), re.IGNORECASE)
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in (REPO / "launcher").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "the launcher names architectures:\n" + "\n".join(hits)


def test_fit_and_metadata_schema_import_without_torch():
    code = "import sys, fit.cli, fit.report, fit.data, zoo.hub.metadata; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("room", ROOMS)
def test_cited_design_notes_ship_in_docs(room):
    """Every ``docs/X.md`` or ``FILE.md`` a module cites exists inside the repository."""
    cited = set()
    for path in (REPO / room).rglob("*.py"):
        cited |= set(re.findall(r"\b((?:docs/)?[A-Z][A-Za-z_]*\.md|docs/[\w/.-]+\.md)\b", path.read_text()))
    missing = sorted(c for c in cited if not (REPO / c).is_file() and not (REPO / "docs" / c).is_file())
    assert not missing, f"{room} cites notes that are not in the repository: {missing}"

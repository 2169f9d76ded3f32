"""The packages read like their data flow: no import circle, no module importing from a floor above its own, and
every module path the README, docs and notebooks name exists."""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"ptp_core.io", "ptp_core.versions"}  # used on every floor; they import nothing of ours
# each package's floors, lowest first: a module may import its own floor and those below
FLOORS = {
    "ptp_core": ["ptp_core.tasks", "ptp_core.model", "ptp_core.training", "ptp_core"],
    "landscape": ["landscape.hessian landscape.surface landscape.stats", "landscape.grid", "landscape.measures",
                  "landscape.connect", "landscape.compare", "landscape.draw", "landscape.demo_pipeline",
                  "landscape.cli", "landscape"],
}
ENTRY_POINTS = {"landscape.plot", "landscape.demo", "landscape.grid.__main__", "landscape.connect.__main__"}


def modules() -> dict[str, Path]:
    found = {}
    for package in FLOORS:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules a file imports, at module level or inside functions (a lazy import still joins the floors)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in known:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known)
            found |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
    return found


def floor(name: str) -> tuple[str, int]:
    package = name.split(".")[0]
    for level, members in reversed(list(enumerate(FLOORS[package]))):
        if any(name == m or name.startswith(m + ".") for m in members.split()):
            return package, level
    raise AssertionError(f"{name} is on no floor")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_no_module_imports_from_a_floor_above_its_own():
    wrong = []
    for name, targets in graph().items():
        if name in ENTRY_POINTS or name in LEAVES or name in FLOORS:
            continue
        package, level = floor(name)
        for target in targets - LEAVES:
            if target.split(".")[0] == package and floor(target)[1] > level:
                wrong.append(f"{name} -> {target}")
            if package == "ptp_core" and target.startswith("landscape"):
                wrong.append(f"{name} -> {target} (ptp_core never imports landscape)")
    assert not wrong, wrong


def test_leaves_import_nothing_of_ours_and_there_is_no_circle():
    edges = graph()
    assert all(not edges[leaf] for leaf in LEAVES), {leaf: edges[leaf] for leaf in LEAVES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if target in FLOORS:  # a package's __init__ (lazy names only) is not a step of the flow
                continue
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [name, target]))
            if target not in state:
                visit(target, path + [name])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb")),
             ROOT / "bench" / "README.md", ROOT / "experiments" / "ptp_study" / "README.md"]
DOTTED = re.compile(r"\b(?:ptp_core|landscape)(?:\.[A-Za-z_]\w*)+")
FILES = re.compile(r"(?<![/\w])(?:ptp_core|landscape|tests|bench)(?:/\w+)+\.py\b")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_module_path_the_docs_name_exists(document):
    text = document.read_text()
    missing = [path for path in set(FILES.findall(text)) if not (ROOT / path).is_file()]
    for dotted in sorted(set(DOTTED.findall(text))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix; the rest are attributes
            try:
                value = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[cut:]:
            if not hasattr(value, attribute):
                missing.append(dotted)
                break
            value = getattr(value, attribute)
    assert not missing, missing

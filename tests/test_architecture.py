"""docs/architecture.md lists every module of the package, and only modules that exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _listed() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text("utf-8")
    return set(re.findall(r"^\| `(polyalign/[\w/]+\.py)` \|", text, flags=re.M))


def _modules() -> set[str]:
    found = set()
    for path in (ROOT / "polyalign").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" and path.parent != ROOT / "polyalign":
            continue  # a subpackage's empty __init__ is not a module of its own
        found.add(rel)
    return found


def test_every_listed_module_exists():
    listed = _listed()
    assert listed, "the module table of docs/architecture.md was not found"
    missing = sorted(m for m in listed if not (ROOT / m).is_file())
    assert not missing, f"docs/architecture.md lists modules that do not exist: {missing}"


def test_every_module_is_listed():
    unlisted = sorted(_modules() - _listed())
    assert not unlisted, f"modules missing from docs/architecture.md: {unlisted}"

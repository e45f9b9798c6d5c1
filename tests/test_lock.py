"""requirements-lock.txt (what make demo / make test install) agrees with pyproject.toml's ranges."""
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, str]:
    """name -> version of every lock line whose marker holds on this interpreter."""
    out = {}
    for line in (ROOT / "requirements-lock.txt").read_text("utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(default_environment()):
                (spec,) = req.specifier
                assert spec.operator == "==", line          # a lock pins, it never ranges
                out[canonicalize_name(req.name)] = spec.version
    return out


def test_every_dependency_is_locked_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = locked()
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "torch":                     # installed from TORCH_SPEC by the Makefile, not locked
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is not in requirements-lock.txt: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} outside {req}"


def test_the_installed_set_is_the_locked_one():
    """What this environment runs is the lock (make test installs it); a stale venv fails here."""
    import importlib.metadata as md
    for name, version in locked().items():
        try:
            assert md.version(name) == version, f"{name}: {md.version(name)} installed, {version} locked"
        except md.PackageNotFoundError:         # a platform-only package (e.g. colorama on Windows)
            pass

"""The language registry, read from resources/languages.yaml."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

import yaml

from polyalign.errors import PolyalignError


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    native: str
    script: str
    resource: str  # "high" or "low", the paper's grouping


@lru_cache(maxsize=1)
def registry() -> dict[str, Language]:
    raw = yaml.safe_load(files("polyalign").joinpath("resources/languages.yaml").read_text("utf-8"))
    return {str(code): Language(str(code), **spec) for code, spec in raw.items()}


ALL = tuple(registry())
HIGH = tuple(c for c, lang in registry().items() if lang.resource == "high")
LOW = tuple(c for c, lang in registry().items() if lang.resource == "low")


def get(code: str) -> Language:
    try:
        return registry()[code]
    except KeyError:
        raise PolyalignError(f"unknown language {code!r}; known: {' '.join(ALL)}") from None


def parse_langs(spec: str | list[str] | None) -> list[str]:
    """'all', 'high', 'low', or a comma list such as 'zh,de' -> validated codes in registry order."""
    if spec is None or spec == "all":
        return list(ALL)
    if spec == "high":
        return list(HIGH)
    if spec == "low":
        return list(LOW)
    codes = [c.strip() for c in spec.split(",") if c.strip()] if isinstance(spec, str) else list(spec)
    if not codes:
        raise PolyalignError("no language given: use all, high, low or a comma list such as en,de")
    for c in codes:
        get(c)
    return codes

"""polyalign: multilingual alignment research on LLMs (Zhang et al. 2024, "Getting More from Less").

From Python (see polyalign/api.py and examples/python_api.py):

    import polyalign as pa
    lm = pa.load_model("gemma-3-270m")
    result = pa.evaluate(lm, langs=["en", "de"], limit=8)     # in memory; output=... writes and resumes
    result.to_pandas()
    pa.logit_lens(lm, langs=["zh"], limit=8).figure("zh")

Importing polyalign is cheap (no torch): each name loads its module when first used.
"""
from __future__ import annotations

from polyalign.errors import PolyalignError

# name -> the module that defines it. None of these names is a subpackage or module of polyalign,
# so that importing one (polyalign.reporting, polyalign.evaluation) never replaces a function here.
_LAZY = {
    "load_model": "polyalign.api",
    "load_task": "polyalign.api",
    "load_data": "polyalign.api",
    "evaluate": "polyalign.api",
    "prepare_pairs": "polyalign.api",
    "train": "polyalign.api",
    "logit_lens": "polyalign.api",
    "geometry": "polyalign.api",
    "neurons": "polyalign.api",
    "report": "polyalign.api",
    "PreparedPairs": "polyalign.api",
    "TrainResult": "polyalign.api",
    "ReportResult": "polyalign.api",
    "EvalResult": "polyalign.evaluation.evaluate",
    "EvalRow": "polyalign.evaluation.evaluate",
    "EvalAverage": "polyalign.evaluation.evaluate",
    "LensResult": "polyalign.analysis.lens",
    "GeometryResult": "polyalign.analysis.geometry",
    "NeuronsResult": "polyalign.analysis.neurons",
    "LoadedModel": "polyalign.models",
    "Task": "polyalign.tasks",
}

__all__ = ["PolyalignError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value          # later lookups skip this function
        return value
    raise AttributeError(f"module 'polyalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

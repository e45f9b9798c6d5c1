"""Shared matplotlib helpers for the analysis commands: the house style, figures, atomic PNG writes.

Figures are plain `matplotlib.figure.Figure` objects, never pyplot's: the library selects no backend and
changes no global setting (a notebook keeps its inline plots and its own rcParams). The house style is
applied per figure, with `style()` around the drawing; `save` renders the PNG with matplotlib's own
canvas for the format (Agg), whatever backend the process uses.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from polyalign.store import atomic_path

# Curves of the logit lens: colour = which language, dash = the gold answer or all answers.
MEASURE_STYLE = {
    "target_answer": {"color": "tab:blue", "linestyle": "-", "label": "target answer"},
    "english_answer": {"color": "tab:orange", "linestyle": "-", "label": "English answer"},
    "target_all": {"color": "tab:blue", "linestyle": ":", "label": "all target answers"},
    "english_all": {"color": "tab:orange", "linestyle": ":", "label": "all English answers"},
}
MODEL_LINESTYLES = ["-", "--", "-.", ":"]

# The analysis figures' look, applied only while one is drawn and saved (see style()).
STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "font.size": 9,
}


def style():
    """A context in which new figures, axes and artists take the house style; rcParams are restored after."""
    return matplotlib.rc_context(STYLE)


def figure(**kwargs) -> Figure:
    """A new Figure outside pyplot (draw it inside style() to get the house look)."""
    return Figure(**kwargs)


def lang_colors(langs: list[str]) -> dict[str, tuple]:
    """A stable, distinguishable colour per language (tab10, then tab20)."""
    cmap = matplotlib.colormaps["tab10" if len(langs) <= 10 else "tab20"]
    return {lang: cmap(i % cmap.N) for i, lang in enumerate(langs)}


def model_linestyle(i: int) -> str:
    return MODEL_LINESTYLES[i % len(MODEL_LINESTYLES)]


def save(fig: Figure, path: Path, tight: bool = True) -> Path:
    """Write the figure beside `path`, then rename over it (never a half-written PNG). `tight` crops it to
    its artists (bbox_inches="tight")."""
    path = Path(path)
    with atomic_path(path) as tmp, style():
        fig.savefig(tmp, **({"bbox_inches": "tight"} if tight else {}))
    return path

"""Shared matplotlib helpers for the analysis commands (headless Agg backend, atomic PNG writes)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from polyalign.store import atomic_path  # noqa: E402

# Curves of the logit lens: colour = which language, dash = the gold answer or all answers.
MEASURE_STYLE = {
    "target_answer": {"color": "tab:blue", "linestyle": "-", "label": "target answer"},
    "english_answer": {"color": "tab:orange", "linestyle": "-", "label": "English answer"},
    "target_all": {"color": "tab:blue", "linestyle": ":", "label": "all target answers"},
    "english_all": {"color": "tab:orange", "linestyle": ":", "label": "all English answers"},
}
MODEL_LINESTYLES = ["-", "--", "-.", ":"]

plt.rcParams.update({
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "font.size": 9,
})


def lang_colors(langs: list[str]) -> dict[str, tuple]:
    """A stable, distinguishable colour per language (tab10, then tab20)."""
    cmap = plt.get_cmap("tab10" if len(langs) <= 10 else "tab20")
    return {lang: cmap(i % cmap.N) for i, lang in enumerate(langs)}


def model_linestyle(i: int) -> str:
    return MODEL_LINESTYLES[i % len(MODEL_LINESTYLES)]


def save(fig, path: Path) -> Path:
    """Write the figure beside `path`, then rename over it (never a half-written PNG); closes it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path

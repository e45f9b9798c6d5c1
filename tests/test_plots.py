"""Figures are matplotlib Figures outside pyplot: drawing them selects no backend, changes no rcParams and
never imports pyplot (so a notebook keeps its inline plots and its settings)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(r"""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import matplotlib
    import numpy as np

    def snapshot():
        rc = matplotlib.rcParams.copy()
        return {k: rc._get(k) for k in rc}      # _get: reading "backend" must not resolve it

    before = snapshot()
    from polyalign.analysis import geometry, lens
    from polyalign.reporting import plots, report
    from polyalign.training import train
    assert snapshot() == before, "importing changed rcParams"

    out = Path(sys.argv[1])
    langs, layers, n = ["en", "de", "sw"], 4, 6
    specs = [SimpleNamespace(label="base"), SimpleNamespace(label="tuned")]
    rng = np.random.default_rng(0)

    def band(v):
        return (v, np.clip(v - 0.05, 0, 1), np.clip(v + 0.05, 0, 1))

    measures = ("target_answer", "english_answer", "target_all", "english_all")
    stats = {s.label: {lang: {"n": n, **{m: band(rng.random(layers + 1)) for m in measures},
                              "entropy_bits": band(3 * rng.random(layers + 1))} for lang in langs} for s in specs}
    pairs = [(a, b) for i, a in enumerate(langs) for b in langs[i + 1:]]
    results = {s.label: ({L: {lang: rng.normal(size=(n, 2)) for lang in langs} for L in range(layers + 1)},
                         {L: [0.5, 0.2] for L in range(layers + 1)},
                         [(L, a, b, float(rng.uniform(-1, 1))) for L in range(layers + 1) for a, b in pairs],
                         [geometry.AlignmentRow(L, lang, 0.8, 0.6, 0.5) for L in range(layers + 1) for lang in langs])
               for s in specs}
    paths = [
        lens.plot_lang(out / "lens_de.png", "de", specs, stats),
        lens.plot_overlay(out / "lens_overlay.png", langs, specs, stats),
        geometry.plot_pca(out / "pca_layer2.png", 2, langs, specs, results),
        geometry.plot_pearson(out / "pearson_layer2.png", 2, langs, specs, results),
        geometry.plot_alignment(out / "alignment.png", langs, specs, results, "en", "mean"),
        report._heatmap(out / "heatmap.png", ["base", "tuned"], langs, [[0.5, 0.6, None], [0.7, 0.4, 0.9]], "acc"),
        report._heatmap(out / "delta.png", ["tuned"], langs, [[0.2, -0.2, None]], "delta", diverging=True),
    ]
    train.plot_losses([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}],
                      out / "loss.png")
    figs = [lens.lang_figure("de", specs, stats), geometry.alignment_figure(langs, specs, results, None, "mean"),
            report.heatmap_figure(["a"], langs, [[0.1, 0.2, 0.3]], "t"), train.loss_figure([{"step": 1, "loss": 1.0}])]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figs)
    # The house style holds inside the figures, and nowhere else.
    with plots.style():
        assert matplotlib.rcParams["font.size"] == 9
    assert snapshot() == before, "drawing changed rcParams"
    assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
    for p in [*paths, out / "loss.png"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    print("ok", len(paths) + 1)
""")


def test_figures_leave_matplotlib_alone(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=root,
                          env={**env, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "8"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        ["lens_de.png", "lens_overlay.png", "pca_layer2.png", "pearson_layer2.png", "alignment.png",
         "heatmap.png", "delta.png", "loss.png"])

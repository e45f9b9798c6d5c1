"""`polyalign report`: tables, statistics, exports and the self-contained HTML, on fake artefacts."""
from __future__ import annotations

import base64
import csv
import json
import os
import random
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from polyalign import languages
from polyalign.errors import PolyalignError
from polyalign.reporting.report import build_report
from polyalign.stats import paired_bootstrap_delta
from polyalign.training.train import TrainSummary

LANGS = list(languages.ALL)
N = 40


def _png(path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [1, 0.5, 0.2])
    ax.set_title(title)
    fig.savefig(path, dpi=50)


def _eval(folder: Path, task: str, outcomes: dict[str, list[bool]], adapter: str | None = None) -> None:
    rows = []
    for lang, oc in outcomes.items():
        p = folder / "samples" / task / "english" / f"{lang}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps({"id": f"x{i}", "lang": lang, "pred": "positive", "gold": "positive",
                                         "correct": c}) + "\n" for i, c in enumerate(oc)), "utf-8")
        rows.append({"task": task, "lang": lang, "labels": "english", "scoring": "paper", "n": len(oc),
                     "acc": sum(oc) / len(oc), "ci_low": 0, "ci_high": 1, "ties": 0, "truncated": 0})
    (folder / "results.json").write_text(json.dumps({"rows": rows, "averages": [], "model": {"adapter": adapter},
                                                     "config": {"scoring": "paper"}}), "utf-8")


def make_run(root: Path, with_analyses: bool = True) -> tuple[Path, dict]:
    """A finished run folder: base, a setting with a clear gain, a setting identical to the base."""
    rng = random.Random(0)
    base = {lang: [rng.random() < 0.55 for _ in range(N)] for lang in LANGS}
    gain = {lang: [c or rng.random() < 0.6 for c in oc] for lang, oc in base.items()}   # only flips to correct
    same = {lang: list(oc) for lang, oc in base.items()}
    steps = []

    def step(kind, label, setting=None, task="amazon_polarity"):
        d = f"steps/{kind}-{len(steps):04d}"
        (root / d).mkdir(parents=True)
        (root / d / "done.json").write_text(json.dumps({"key": "k"}), "utf-8")
        # The outputs a finished step of each kind leaves (an eval's are written by _eval).
        output = {"prepare": "train.jsonl", "train": "adapter_config.json", "lens": "summary.json",
                  "geometry": "summary.json"}.get(kind)
        if output:
            (root / d / output).write_text("{}\n", "utf-8")
        steps.append({"kind": kind, "label": label, "model": "tiny", "setting": setting, "task": task,
                      "key": f"k{len(steps)}", "dir": d, "status": "done", "seconds": 10.0 + len(steps)})
        return root / d

    _eval(step("eval", "eval base"), "amazon_polarity", base)
    for name, oc in (("zhde-en", gain), ("sw-en", same)):
        step("prepare", f"prepare {name}", name)
        t = step("train", f"train {name}", name)
        (t / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            {"step": 1, "epoch": 0.5, "loss": 2.5, "lr": 1e-4}, {"step": 2, "epoch": 1.0, "loss": 1.5, "lr": 5e-5},
            {"step": 2, "epoch": 1.0, "eval_loss": 1.7}]), "utf-8")
        TrainSummary(examples=64, seconds=12.5).write(t)      # through train's own record
        _png(t / "loss.png", f"loss {name}")
        _eval(step("eval", f"eval {name}", name), "amazon_polarity", oc, adapter="a")
    if with_analyses:
        lens = step("lens", "lens base vs zhde-en", "zhde-en")
        with (lens / "lens.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "lang", "layer", "measure", "mean", "ci_low", "ci_high", "n"])
            for model in ("base", "zhde-en"):
                for layer in range(4):
                    for measure, v in (("english_answer", 0.1 * layer * (layer < 3)), ("target_answer", 0.2 * layer),
                                       ("entropy_bits", 5 - layer)):
                        w.writerow([model, "zh", layer, measure, v, v, v, 10])
        (lens / "excluded.csv").write_text("model,lang,class,n_excluded,n_total\nbase,zh,positive,0,5\n", "utf-8")
        _png(lens / "lens_overlay.png", "overlay")
        _png(lens / "lens_zh.png", "zh")
        geo = step("geometry", "geometry base vs zhde-en", "zhde-en")
        with (geo / "pearson.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "layer", "lang_a", "lang_b", "r"])
            for model in ("base", "zhde-en"):
                for layer in range(5):
                    w.writerow([model, layer, "en", "sw", 0.2 + 0.1 * layer + (0.2 if model != "base" else 0)])
        with (geo / "alignment.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "layer", "lang", "cos_parallel", "cos_nonparallel", "retrieval_acc"])
            for model in ("base", "zhde-en"):
                for layer in range(5):
                    w.writerow([model, layer, "sw", 0.8, 0.6, 0.5])
        for name in ("alignment", "pearson_layer3", "pca_layer3"):
            _png(geo / f"{name}.png", name)
    manifest = {
        "name": "fake", "description": "A fake run.", "hardware": "none",
        "models": [{"name": "tiny", "label": "tiny", "dtype": "fp32", "slug": "tiny"}],
        "settings": [{"name": "zhde-en", "label": "zh/de ⇒ en", "sources": ["zh", "de"], "target": "en",
                      "task": "amazon_polarity", "seen": ["zh", "de", "en"], "per_language": 32, "data": None},
                     {"name": "sw-en", "label": "sw ⇒ en", "sources": ["sw"], "target": "en",
                      "task": "amazon_polarity", "seen": ["sw", "en"], "per_language": 32, "data": None}],
        "eval": {"tasks": ["amazon_polarity"], "langs": LANGS, "labels": ["english"], "scoring": "paper",
                 "limit": N, "data": None},
        "report": {"bootstrap": 2000, "seed": 0, "alpha": 0.05},
        "steps": steps,
    }
    (root / "manifest.json").write_text(json.dumps(manifest), "utf-8")
    return root, {"base": base, "zhde-en": gain, "sw-en": same}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root, data = make_run(tmp_path_factory.mktemp("run"))
    html = build_report(root)
    return root, html, data


def _table_rows(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_table1_layout(report):
    root, _, data = report
    md = (root / "report.md").read_text("utf-8")
    header = "| model / setting | " + " | ".join(LANGS) + " | Avg |"
    assert header in md
    rows = _table_rows(md, "model / setting")
    assert [r[0] for r in rows[:3]] == ["tiny (base)", "zh/de ⇒ en", "sw ⇒ en"]
    base, gain = rows[0], rows[1]
    # Seen languages carry a dagger in the setting's row only.
    zh, sv = 1 + LANGS.index("zh"), 1 + LANGS.index("sv")
    assert gain[zh].endswith("†") and not gain[sv].endswith("†") and not base[zh].endswith("†")
    # Values are accuracies in %, the Avg is their mean, and the best per column is bold.
    acc = {k: {lang: 100 * sum(v[lang]) / N for lang in LANGS} for k, v in data.items()}
    assert base[sv].strip("*") == f"{acc['base']['sv']:.1f}"
    assert float(gain[-1].strip("*")) == pytest.approx(sum(acc["zhde-en"].values()) / 20, abs=0.051)
    assert gain[-1].startswith("**") and not base[-1].startswith("**")
    for j, lang in enumerate(LANGS, 1):
        best = max(round(acc[k][lang], 1) for k in acc)
        for r, k in zip(rows[:3], ("base", "zhde-en", "sw-en")):
            assert r[j].startswith("**") == (round(acc[k][lang], 1) == best), (lang, k)


def test_averages_and_deltas(report):
    root, _, data = report
    md = (root / "report.md").read_text("utf-8")
    deltas = _table_rows(md, "setting")
    labels = [r[0] for r in deltas]
    assert labels[:2] == ["zh/de ⇒ en", "sw ⇒ en"]
    # The delta over all languages equals the library's paired bootstrap, as printed.
    # The fake sets are parallel (the same ids in every language): items are resampled across languages.
    d, lo, hi = paired_bootstrap_delta([data["base"][lang] for lang in LANGS], [data["zhde-en"][lang] for lang in LANGS],
                                       n_boot=2000, seed=0, clustered=True)
    cell = deltas[0][1].strip("*")
    assert cell == f"+{100 * d:.1f} [+{100 * lo:.1f}, +{100 * hi:.1f}]"
    assert deltas[0][1].startswith("**")            # CI above zero
    assert deltas[1][1].startswith("0.0 [0.0, 0.0]")
    # CSV exports match.
    rows = list(csv.DictReader((root / "report" / "deltas_amazon_polarity_english.csv").open()))
    assert float(rows[0]["all_delta"]) == pytest.approx(d, abs=1e-4)
    assert int(rows[0]["seen_langs"]) == 3 and int(rows[0]["unseen_langs"]) == 17
    high = [lang for lang in LANGS if lang in languages.HIGH]
    dh, _, _ = paired_bootstrap_delta([data["base"][x] for x in high], [data["zhde-en"][x] for x in high], n_boot=10,
                                      clustered=True)
    assert float(rows[0]["high_delta"]) == pytest.approx(dh, abs=1e-4)


def test_summary_is_honest(report):
    root, _, _ = report
    md = (root / "report.md").read_text("utf-8")
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "**zh/de ⇒ en**" in summary and "a gain: the 95% CI lies above zero" in summary
    assert "On its 3 seen languages: +" in summary and "on the 17 unseen ones: +" in summary
    line_same = next(line for line in summary.splitlines() if "**sw ⇒ en**" in line)
    assert "no clear change" in line_same and "0 significant gains and 0 significant losses" in line_same


def test_mcnemar_exports(report):
    root, _, data = report
    rows = list(csv.DictReader((root / "report" / "mcnemar_amazon_polarity_english.csv").open()))
    assert len(rows) == 2 * 20
    from polyalign.stats import mcnemar
    for r in rows:
        if r["setting"] == "zhde-en":
            lang = r["lang"]
            assert float(r["p_exact"]) == pytest.approx(mcnemar(data["base"][lang], data["zhde-en"][lang]))
            assert int(r["base_only"]) == 0                     # the fake setting only gains
        else:
            assert float(r["p_exact"]) == 1.0 and r["significant"] == "False"


def test_exports_and_latex(report):
    root, _, _ = report
    out = root / "report"
    for stem in ("table1_amazon_polarity_english", "averages_amazon_polarity_english",
                 "deltas_amazon_polarity_english", "mcnemar_amazon_polarity_english", "training", "timing"):
        assert (out / f"{stem}.csv").exists() and (out / f"{stem}.tex").exists(), stem
    tex = (out / "table1_amazon_polarity_english.tex").read_text("utf-8")
    assert r"\begin{tabular}" in tex and r"\textbf{" in tex and r"$^\dagger$" in tex and r"$\Rightarrow$" in tex
    t1 = list(csv.DictReader((out / "table1_amazon_polarity_english.csv").open()))
    assert [r["setting"] for r in t1] == ["base", "zhde-en", "sw-en"] and t1[1]["seen"] == "zh de en"


class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables = 0
        self.imgs: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables += 1
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith(("data:", "#")):
                self.external.append(a[key])


def test_html_is_self_contained(report):
    root, html, _ = report
    p = _Html()
    p.feed(Path(html).read_text("utf-8"))
    assert p.tables >= 8 and not p.external
    # heat maps (2), loss curves (2), lens (2), geometry (3)
    assert len(p.imgs) >= 9
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "report.md").read_text("utf-8")
    for section in ("## Training", "## Logit lens", "## Representation geometry", "## Run time"):
        assert section in md
    assert "0.200 @ 2" in md                       # the lens summary: P(English) peaks at layer 2
    assert "en–sw" in md


def test_partial_run_and_errors(tmp_path):
    root, _ = make_run(tmp_path / "run", with_analyses=False)
    manifest = json.loads((root / "manifest.json").read_text())
    # The last evaluation is unfinished: the report says so and leaves it out.
    manifest["steps"][-1]["status"] = "pending"
    (root / manifest["steps"][-1]["dir"] / "done.json").unlink()
    (root / "manifest.json").write_text(json.dumps(manifest))
    build_report(root)
    md = (root / "report.md").read_text()
    assert "Incomplete run" in md and "sw ⇒ en" not in _table_rows(md, "model / setting")[1][0]
    with pytest.raises(PolyalignError, match="not a run folder"):
        build_report(tmp_path / "nothing")


def test_a_step_whose_results_went_missing_is_reported_not_dropped(tmp_path):
    """Before: the setting vanished from every table and the report said nothing."""
    root, _ = make_run(tmp_path / "run", with_analyses=False)
    manifest = json.loads((root / "manifest.json").read_text())
    gone = next(s for s in manifest["steps"] if s["label"] == "eval zhde-en")
    (root / gone["dir"] / "results.json").unlink()
    cut = next(s for s in manifest["steps"] if s["label"] == "eval base")
    text = (root / cut["dir"] / "results.json").read_text()
    (root / cut["dir"] / "results.json").write_text(text[: len(text) // 2])        # truncated
    build_report(root, bootstrap=200)
    md = (root / "report.md").read_text()
    assert "Incomplete run" in md and "Broken steps" in md
    assert "eval zhde-en: results.json is missing or unreadable" in md
    assert "eval base: results.json is missing or unreadable" in md


def test_cli_report(tmp_path, capsys):
    from polyalign import cli

    root, _ = make_run(tmp_path / "run", with_analyses=False)
    assert cli.main(["report", str(root), "--bootstrap", "200"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(root / "report.html")
    assert cli.main(["report", str(tmp_path / "nope")]) == 2


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(report, tmp_path):
    import numpy as np
    from matplotlib.image import imread

    _, html, _ = report
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,3000",
                        Path(html).resolve().as_uri()], check=True, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    img = imread(shot)
    assert img.shape[0] >= 2000 and img.shape[1] >= 1000
    rgb = img[..., :3]
    # Not blank: dark text, light background, and the heat map's colours.
    assert rgb.min() < 0.2 and rgb.max() > 0.9 and rgb.std() > 0.05
    colourful = np.abs(rgb[..., 0] - rgb[..., 2]) > 0.2
    assert colourful.mean() > 0.001


def test_training_table_reads_what_train_writes(tmp_path, tiny_llama_path):
    """The training step's folder is written by a real `train` run, not by hand: before, the report read
    `train_examples` while train wrote `examples`, and no real report showed its number of training pairs."""
    from conftest import write_jsonl

    from polyalign.training import train as T

    root, _ = make_run(tmp_path / "run", with_analyses=False)
    step = next(s for s in json.loads((root / "manifest.json").read_text())["steps"] if s["kind"] == "train")
    folder = root / step["dir"]
    shutil.rmtree(folder)                      # the fake outputs; train writes the real ones here
    pairs = [{"input": f"Frage {i}: rot blau?", "output": f"Question {i}: red blue?"} for i in range(10)]
    write_jsonl(tmp_path / "pairs" / "train.jsonl", pairs)
    write_jsonl(tmp_path / "pairs" / "val.jsonl", pairs[:2])
    summary = T.train(T.TrainConfig(model=tiny_llama_path, data=str(tmp_path / "pairs"), output=str(folder),
                                    progress=False, overrides=["threads=1", "dtype=fp32", "max_steps=2",
                                                               "batch_size=4", "micro_batch_size=4"]))
    (folder / "done.json").write_text(json.dumps({"key": "k"}), "utf-8")
    build_report(root, bootstrap=50)
    with (root / "report" / "training.csv").open(encoding="utf-8", newline="") as f:
        rows = {r["step"]: r for r in csv.DictReader(f)}
    real = rows[step["label"]]
    assert summary["examples"] == 10 and real["train pairs"] == "10"
    assert real["steps"] == "2" and real["seconds"] == f"{summary['seconds']:.0f}"
    assert real["final eval loss"] == f"{summary['final_eval_loss']:.3f}"
    md = (root / "report.md").read_text("utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| step | model | setting |"))
    assert "train pairs" in header


@pytest.mark.parametrize("content", ['{"rows": [{"task": "amazon', "", "[]"], ids=["truncated", "empty", "list"])
def test_damaged_results_json_is_one_line(tmp_path, capsys, content):
    from polyalign import cli

    root, _ = make_run(tmp_path / "run", with_analyses=False)
    manifest = json.loads((root / "manifest.json").read_text())
    res = root / next(s["dir"] for s in manifest["steps"] if s["kind"] == "eval") / "results.json"
    res.write_text(content, "utf-8")
    assert cli.main(["report", str(root), "--bootstrap", "200"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(res.parent) in err and "results.json" in err and "done.json" in err


# ----------------------------------------------------------------------------- issue 13: language neurons
def test_language_neurons_section_from_a_real_run(tmp_path, tiny_llama_path, one_thread, capsys):
    """A tiny experiment with the neurons analysis through `polyalign run` (every step real); the
    section's numbers against the step's own files: neurons.json and the evaluations' results.json."""
    import yaml

    from polyalign import cli
    from polyalign.analysis.neurons import jaccard
    from polyalign.reporting.neurons import MARGIN, STABLE
    raw = {"name": "neu", "model": tiny_llama_path, "dtype": "fp32", "device": "cpu",
           "settings": [{"sources": ["zh", "de"], "task": "amazon_polarity", "per_language": 8,
                         "prepare": {"val_size": 2}}],
           "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "eval_steps": 1},
           "eval": {"tasks": ["snli"], "langs": ["en", "zh"], "limit": 3},
           "analyses": {"neurons": {"langs": ["en", "de", "zh", "ja"],
                                    "options": {"tokens_per_language": 600, "top_rate": 0.05, "deactivate": True,
                                                "eval_langs": "en,zh", "eval_limit": 3}}},
           "report": {"bootstrap": 200}}
    path = tmp_path / "neu.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert cli.main(["run", str(path), "--output", str(run)]) == 0
    capsys.readouterr()
    manifest = json.loads((run / "manifest.json").read_text())
    step = next(s for s in manifest["steps"] if s["kind"] == "neurons")
    folder = run / step["dir"]
    lists = json.loads((folder / "neurons.json").read_text())["models"]
    assert list(lists) == ["base", "zhde-en"]            # the adapter is named after its setting
    md = (run / "report.md").read_text()
    section = md[md.index("## Language neurons"):]
    section = section[:section.index("\n## ", 5)]

    def table(caption_start: str) -> list[list[str]]:
        """The body rows of the Markdown table whose caption (the line below it) holds caption_start."""
        lines = section.splitlines()
        end = next(i for i, line in enumerate(lines) if line.startswith("*") and caption_start in line) - 1
        start = end
        while start > 0 and lines[start - 1].startswith("|"):
            start -= 1
        return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start + 2:end]]

    sets = {m: {lang: {(int(layer), i) for layer, idx in per.items() for i in idx}
                for lang, per in lists[m]["neurons"].items()} for m in lists}
    langs = ["en", "de", "zh", "ja"]
    layers = table("language-specific neurons per layer")
    for row in layers:
        layer = int(row[0])
        assert [int(c) for c in row[1:]] == [sum(1 for lang in langs for (li, _) in sets[m][lang] if li == layer)
                                             for m in ("base", "zhde-en")]
    per_lang = {row[0]: row for row in table("language-specific neurons per language")}
    seen = {"zh", "de", "en"}
    for lang in langs:
        base, trained = sets["base"][lang], sets["zhde-en"][lang]
        row = per_lang[lang]
        assert int(row[1]) == len(base) and row[2] == f"{len(trained)}{'†' if lang in seen else ''}"
        j = jaccard(base, trained)
        assert row[3] == ("—" if j != j else f"{j:.2f}")
    # The sentence: the numbers and the verdict the stated rules give for them.
    js = [jaccard(sets["base"][lang], sets["zhde-en"][lang]) for lang in ("en", "de", "zh")]
    js = sum(x for x in js if x == x) / max(1, sum(1 for x in js if x == x))
    ju = jaccard(sets["base"]["ja"], sets["zhde-en"]["ja"])
    sentence = next(line for line in section.splitlines() if line.startswith("- zhde-en:"))
    assert f"share {js:.2f}" in sentence
    if ju == ju:
        assert f"share {ju:.2f}" in sentence
        verdict = ("largely unchanged" if js >= STABLE and ju >= STABLE else
                   "seen languages' neurons more" if js + MARGIN <= ju else
                   "unseen languages' neurons more" if ju + MARGIN <= js else "alike")
        assert verdict in sentence
    # The deactivation matrices: each evaluation's accuracy minus the one with nothing zeroed.
    acc = {}
    for name in ("none", "en", "de", "zh", "ja", "random-en", "random-de", "random-zh", "random-ja"):
        found = list((folder / "deactivate").glob(f"{name}-????????"))
        if found:
            res = json.loads((found[0] / "results.json").read_text())
            acc[name] = {r["lang"]: r["acc"] for r in res["rows"]}
    zeroed = [lang for lang in langs if lang in acc]
    assert zeroed
    for caption, prefix in (("with the language neurons zeroed", ""), ("with the random control", "random-")):
        rows = {row[0]: row[1:] for row in table(caption)}
        assert list(rows) == zeroed
        for lang in zeroed:
            assert rows[lang] == [f"{100 * (acc[prefix + lang][e] - acc['none'][e]):+.1f}" for e in ("en", "zh")]
    assert any(line.startswith("- Deactivation: zeroing a language's neurons") for line in section.splitlines())
    assert "neuron_counts_base.png" in section or "neuron counts base" in section

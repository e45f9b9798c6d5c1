"""Calibrated scoring (contextual, PMI) and the label-bias diagnostics, against naive references."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import entropy
from toydata import CLASSES, DEMOS, toy

from polyalign import cli
from polyalign.evaluation import calibration, diagnostics
from polyalign.evaluation import evaluate as evaluate_mod
from testdevice import DEVICE


def run(*argv) -> int:
    return cli.main(["evaluate", "--dtype", "fp32", "--device", DEVICE, "--no-progress", *map(str, argv)])


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text("utf-8").splitlines()]


def sample_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "samples").rglob("*")) if p.is_file()}


def demos_by_hand(lang: str, mode: str) -> str:
    """The demos written out independently of polyalign.tasks (as toydata.expected_prompt does)."""
    template, native, demos = DEMOS[lang]
    words = native if mode == "native" else {"positive": "positive", "negative": "negative"}
    return "".join(template.format(review=d) + words[c] + '"' + "\n" for c, d in zip(CLASSES, demos))


CUES = {"en": 'Answer: "', "de": 'Antwort: "'}   # the templates' text after {review}, by hand


def normalise(v):
    v = np.asarray(v, dtype=float)
    return v / v.sum()


def as_probs(scores, rule):
    return np.exp(np.asarray(scores, dtype=float)) if rule == "sequence" else np.asarray(scores, dtype=float)


@pytest.fixture(scope="module")
def calibrated_runs(tmp_path_factory, tiny_llama_path):
    """Calibrated runs under the paper and sequence rules (en, de; english and native labels)."""
    tmp = tmp_path_factory.mktemp("calibrated")
    task, data = toy(tmp)
    outs = {}
    for rule in ("paper", "sequence"):
        outs[rule] = tmp / rule
        assert run("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en,de",
                   "--labels", "english,native", "--scoring", rule, "--calibration", "contextual",
                   "--batch-tokens", 160, "--output", outs[rule]) == 0
    return task, data, outs


@pytest.mark.parametrize("rule", ["paper", "sequence"])
def test_calibrated_scores_match_naive_forwards(calibrated_runs, tiny_llama_path, rule):
    """contextual: naive forwards of the three content-free prompts, each normalised over the classes,
    averaged, then p / p_cf renormalised. pmi: a naive forward of the prompt and one of the demos + the
    answer cue, p / p_cue renormalised (= softmax of the log-probability difference)."""
    from polyalign.evaluation.scoring import naive_scores
    from polyalign.labels import label_plan
    from polyalign.models import load_model

    _, _, outs = calibrated_runs
    out = outs[rule]
    lm = load_model(tiny_llama_path, dtype="fp32", device=DEVICE)
    results = json.loads((out / "results.json").read_text("utf-8"))
    for lang, mode in (("en", "english"), ("de", "native")):
        words = list(DEMOS[lang][1].values()) if mode == "native" else CLASSES
        plan = label_plan(lm.tokenizer, CLASSES, words)
        demos = demos_by_hand(lang, mode)
        template = DEMOS[lang][0]
        cf = [as_probs(naive_scores(lm.model, lm.tokenizer, plan, demos + template.format(review=x), rule), rule)
              for x in ("", "N/A", "[MASK]")]
        p_cf = np.mean([normalise(p) for p in cf], axis=0)
        p_cue = as_probs(naive_scores(lm.model, lm.tokenizer, plan, demos + CUES[lang], rule), rule)

        saved = json.loads((out / "calibration" / "toy_polarity" / mode / f"{lang}.json").read_text("utf-8"))
        assert saved["contextual"] == pytest.approx(p_cf.tolist(), abs=1e-5)
        assert normalise(saved["pmi"]) == pytest.approx(normalise(p_cue).tolist(), abs=1e-5)

        samples = lines(out / "samples" / "toy_polarity" / mode / f"{lang}.jsonl")
        n_right = {"contextual": 0, "pmi": 0}
        for s in samples:
            p = as_probs(s["scores"], rule)
            want = {"contextual": normalise(p / p_cf), "pmi": normalise(p / p_cue)}
            for m in ("contextual", "pmi"):
                assert s["calibrated"][m] == pytest.approx(want[m].tolist(), abs=1e-5)
                assert s["pred_calibrated"][m] == CLASSES[int(np.argmax(want[m]))]
                n_right[m] += s["pred_calibrated"][m] == s["gold"]
        row = next(r for r in results["rows"] if (r["lang"], r["labels"]) == (lang, mode))
        assert row["acc_calibrated"] == {m: pytest.approx(k / len(samples)) for m, k in n_right.items()}
        assert set(row["bias_calibrated"]) == {"contextual", "pmi"}
        assert row["p_ref"]["contextual"] == pytest.approx(p_cf.tolist(), abs=1e-5)


def test_calibration_flips_the_predictions_of_a_biased_model():
    """A model that prefers class 0 on every input (content-free prompts included): raw it answers one
    class and scores 50% on a balanced set; divided by p_cf, each item goes to the class whose
    probability exceeds its prior share, which here is the gold one."""
    p_cf = [0.9, 0.1]
    items = [([0.95, 0.05], "a"), ([0.97, 0.03], "a"), ([0.6, 0.4], "b"), ([0.7, 0.3], "b")]
    classes = ["a", "b"]
    raw = [classes[int(np.argmax(s))] for s, _ in items]
    assert raw == ["a"] * 4
    calibrated = [calibration.calibrate(s, p_cf, "paper") for s, _ in items]
    # p(b)/p_cf(b) > p(a)/p_cf(a)  <=>  p(b) > 0.1 (two classes, p(a) = 1 - p(b))
    preds = [classes[int(np.argmax(c))] for c in calibrated]
    assert preds == [g for _, g in items]
    assert sum(p != r for p, r in zip(preds, raw)) == 2
    # In log space for `sequence`: the same flip from log-likelihoods.
    seq = [calibration.calibrate(list(np.log(s) - 500.0), p_cf, "sequence") for s, _ in items]
    assert np.asarray(seq) == pytest.approx(np.asarray(calibrated))

    samples = [{"gold": g, "pred": r, "scores": s, "calibrated": {m: c for m in calibration.METHODS},
                "pred_calibrated": {m: p for m in calibration.METHODS}}
               for (s, g), r, c, p in zip(items, raw, calibrated, preds)]
    fields = diagnostics.summary_fields(samples, "paper")
    assert fields["bias"]["answers_one_class"] is True and fields["bias"]["majority_share"] == 1.0
    assert fields["bias_calibrated"]["contextual"]["answers_one_class"] is False
    assert calibration.accuracy_calibrated(samples) == {"contextual": 1.0, "pmi": 1.0}


def test_bias_diagnostics_against_direct_computation():
    rng = np.random.default_rng(3)
    classes = ["x", "y", "z"]
    golds = [classes[i % 3] for i in range(30)]
    scores = rng.dirichlet([1, 1, 1], size=30) * rng.uniform(0.2, 1.0, size=(30, 1))   # unnormalised
    preds = [classes[int(np.argmax(s))] for s in scores]
    samples = [{"gold": g, "pred": p, "scores": s.tolist()} for g, p, s in zip(golds, preds, scores)]
    b = diagnostics.summary_fields(samples, "paper")["bias"]
    counts = np.array([preds.count(c) for c in classes])
    assert [b["shares"][c] for c in classes] == pytest.approx((counts / 30).tolist())
    assert b["entropy_bits"] == pytest.approx(entropy(counts / 30, base=2))
    q = np.sort(scores / scores.sum(1, keepdims=True), axis=1)
    assert b["mean_margin"] == pytest.approx(float(np.mean(q[:, -1] - q[:, -2])))
    assert b["balanced"] is True and b["majority_class"] == classes[int(np.argmax(counts))]
    assert b["answers_one_class"] is bool(counts.max() / 30 >= 0.9)
    # sequence: margins on the softmax of the log-likelihoods
    ll = np.log(scores)
    seq = diagnostics.summary_fields([{**s, "scores": r.tolist()} for s, r in zip(samples, ll)], "sequence")["bias"]
    assert seq["mean_margin"] == pytest.approx(b["mean_margin"])
    # a skewed gold set: the one-class flag does not apply
    skewed = [{**s, "gold": "x"} for s in samples]
    assert diagnostics.summary_fields(skewed, "paper")["bias"]["answers_one_class"] is None


def test_uncalibrated_run_has_diagnostics_but_no_calibrated_fields(tmp_path, tiny_llama_path):
    task, data = toy(tmp_path, langs=("en",), n=6)
    out = tmp_path / "plain"
    assert run("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en", "--output", out) == 0
    row = json.loads((out / "results.json").read_text("utf-8"))["rows"][0]
    assert "acc_calibrated" not in row and "bias_calibrated" not in row
    assert set(row["bias"]) >= {"shares", "entropy_bits", "mean_margin", "answers_one_class"}
    assert not (out / "calibration").exists()
    assert all("calibrated" not in s for s in lines(out / "samples/toy_polarity/english/en.jsonl"))


def test_unknown_calibration_is_one_line(tmp_path, tiny_llama_path, capsys):
    task, data = toy(tmp_path, langs=("en",), n=4)
    with pytest.raises(SystemExit) as e:
        run("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en",
            "--calibration", "platt", "--output", tmp_path / "o")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--calibration" in err and "platt" in err
    # the work function refuses it too (configs built in code or from experiment files)
    with pytest.raises(Exception, match="unknown calibration 'platt'"):
        evaluate_mod.evaluate(evaluate_mod.EvalConfig(model=tiny_llama_path, tasks=task, data=data, langs="en",
                                                      calibration="platt", output=str(tmp_path / "o2")))


def test_resume_of_a_calibrated_run_gives_the_files_of_an_uninterrupted_one(calibrated_runs, tmp_path,
                                                                           tiny_llama_path, monkeypatch):
    task, data, outs = calibrated_runs
    ref = outs["paper"]
    out = tmp_path / "killed"
    real_append, written = evaluate_mod.append_lines, []

    def append_then_die(path, records):
        real_append(path, records)
        written.extend(records)
        if len(written) >= 14:       # inside the second group (en/native)
            raise KeyboardInterrupt

    args = ("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en,de",
            "--labels", "english,native", "--calibration", "pmi", "--batch-tokens", 160, "--output", out)
    monkeypatch.setattr(evaluate_mod, "append_lines", append_then_die)
    assert run(*args) == 130
    monkeypatch.setattr(evaluate_mod, "append_lines", real_append)
    assert run(*args) == 0
    assert sample_files(out) == sample_files(ref)
    cal = sorted(str(p.relative_to(out)) for p in (out / "calibration").rglob("*.json"))
    assert cal == sorted(str(p.relative_to(ref)) for p in (ref / "calibration").rglob("*.json"))
    got = json.loads((out / "results.json").read_text("utf-8"))["rows"]
    want = json.loads((ref / "results.json").read_text("utf-8"))["rows"]
    keys = ("acc", "acc_calibrated", "bias", "bias_calibrated", "p_ref")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]

    # A folder with calibrated lines refuses an uncalibrated resume (lines would mix).
    assert run(*args[:-4], "--calibration", "none", "--batch-tokens", 160, "--output", out) == 2


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_calibrated_fields_of_one(calibrated_runs, tmp_path):
    launcher = Path(sys.executable).with_name("torchrun")
    if not launcher.exists():
        pytest.skip("torchrun is not installed beside this Python")
    task, data, outs = calibrated_runs
    ref = outs["paper"]
    model = json.loads((ref / "results.json").read_text("utf-8"))["model"]["name"]
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(launcher), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                           "-m", "polyalign", "evaluate", "--model", model, "--tasks", task, "--data", data,
                           "--langs", "en,de", "--labels", "english,native", "--dtype", "fp32", "--device", "auto",
                           "--batch-tokens", "160", "--calibration", "contextual", "--no-progress",
                           "--output", str(multi)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(multi.rglob("*.rank*.jsonl"))
    for f in (ref / "calibration").rglob("*.json"):
        assert json.loads((multi / f.relative_to(ref)).read_text("utf-8"))["contextual"] == pytest.approx(
            json.loads(f.read_text("utf-8"))["contextual"], abs=1e-6)
    for name in sample_files(ref):
        a, b = lines(multi / name), lines(ref / name)
        assert [s["id"] for s in a] == [s["id"] for s in b]
        for x, y in zip(a, b):
            assert x["pred_calibrated"] == y["pred_calibrated"]
            for m in calibration.METHODS:
                assert x["calibrated"][m] == pytest.approx(y["calibrated"][m], abs=1e-5)
    got = json.loads((multi / "results.json").read_text("utf-8"))["rows"]
    want = json.loads((ref / "results.json").read_text("utf-8"))["rows"]
    assert [(r["acc_calibrated"], r["bias"]["shares"], r["bias_calibrated"]["pmi"]["shares"]) for r in got] == \
        [(r["acc_calibrated"], r["bias"]["shares"], r["bias_calibrated"]["pmi"]["shares"]) for r in want]


def test_answer_cue_is_the_template_tail():
    from polyalign.tasks import load_task
    task = load_task("amazon_polarity")
    for lang, spec in task.languages.items():
        cue = calibration.answer_cue(task, lang)
        assert spec.template.endswith(cue) and "{" not in cue and cue.endswith(task.cue)


def test_experiment_files_turn_calibration_on_and_check_it(tmp_path):
    from polyalign.errors import PolyalignError
    from polyalign.experiment import run as X
    exp = X.load_experiment(demo=True, check_data=False)
    assert exp.eval["calibration"] == "contextual"
    evals = [s for s in X.plan(exp) if s.kind == "eval"]
    assert evals[0].config.calibration == "contextual" and evals[0].folder_inputs["calibration"] == "contextual"
    with pytest.raises(PolyalignError, match="eval.calibration must be one of none, contextual, pmi, got 'platt'"):
        X.load_experiment(demo=True, overrides=["eval.calibration=platt"], check_data=False)
    off = X.load_experiment(demo=True, overrides=["eval.calibration=none"], check_data=False)
    off_eval = [s for s in X.plan(off) if s.kind == "eval"][0]
    # off: the command's own default, so the folder is named as before calibration existed
    assert off_eval.config.calibration == "none" and "calibration" not in off_eval.folder_inputs


def test_in_memory_evaluation_gives_the_calibrated_fields_of_a_folder_run(calibrated_runs, tiny_llama_path):
    import polyalign as pa
    task, data, outs = calibrated_runs
    result = pa.evaluate(tiny_llama_path, tasks=task, data=data, langs=["en", "de"], labels=["english", "native"],
                         dtype="fp32", device=DEVICE, batch_tokens=160, calibration="pmi", progress=False)
    want = json.loads((outs["paper"] / "results.json").read_text("utf-8"))["rows"]
    got = [r.to_dict() for r in result.rows]
    for key in ("acc_calibrated", "bias", "bias_calibrated", "p_ref"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    by_id = {(s["lang"], s["labels"], s["id"]): s for s in result.samples}
    for f in (outs["paper"] / "samples").rglob("*.jsonl"):
        for s in lines(f):
            assert by_id[(s["lang"], s["labels"], s["id"])]["calibrated"] == s["calibrated"]

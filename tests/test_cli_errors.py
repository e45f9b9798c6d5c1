"""Bad input: one clear line on stderr, exit status 2, no traceback, and nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toydata import records, toy, write_task

from polyalign import cli


def evaluate(*argv) -> int:
    return cli.main(["evaluate", "--dtype", "fp32", "--device", "cpu", "--no-progress", *map(str, argv)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("polyalign evaluate: error: ")
    return lines[0]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")


def _jsonl(recs) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


# Each case: build the bad input under tmp_path, return (argv, fragments the message must hold).
def case_missing_data_file(tmp, model):
    task, _ = toy(tmp)
    return ["--tasks", task, "--data", str(tmp / "nowhere" / "{lang}.jsonl")], ["not found", "nowhere/en.jsonl"]


def case_missing_data_folder(tmp, model):
    task, _ = toy(tmp)
    return ["--tasks", task, "--data", str(tmp / "no-such-dir")], ["not found", "no-such-dir"]


def case_malformed_json_line(tmp, model):
    task, data = toy(tmp)
    de = tmp / "data" / "de.jsonl"
    rows = de.read_text("utf-8").splitlines()
    rows[2] = rows[2][:-5]  # cut the closing of line 3
    de.write_text("\n".join(rows) + "\n", "utf-8")
    return ["--tasks", task, "--data", data], [f"{de}:3:", "malformed JSON"]


def case_malformed_json_file(tmp, model):
    task, _ = toy(tmp)
    for lang in ("en", "de"):
        _write(tmp / "json" / f"{lang}.json", '[\n  {"id": "a", "review": "x", "label": "positive"},\n  {"id": \n]')
    return ["--tasks", task, "--data", str(tmp / "json" / "{lang}.json")], ["en.json:4:", "malformed JSON"]


def case_unknown_task(tmp, model):
    _, data = toy(tmp)
    return ["--tasks", "no_such_task", "--data", data], ["unknown task 'no_such_task'"]


def case_missing_task_file(tmp, model):
    _, data = toy(tmp)
    return ["--tasks", str(tmp / "nope.yaml"), "--data", data], ["task file not found"]


def case_unknown_language(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--langs", "en,xx"], ["unknown language 'xx'"]


def case_language_the_task_lacks(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--langs", "en,zh"], ["no prompt data for language 'zh'"]


def case_gold_label_outside_label_set(tmp, model):
    task, data = toy(tmp)
    recs = records("de")
    recs[4]["label"] = "maybe"
    _write(tmp / "data" / "de.jsonl", _jsonl(recs))
    return ["--tasks", task, "--data", data], ["'maybe'", "label set", "de.jsonl"]


def case_empty_dataset(tmp, model):
    task, data = toy(tmp)
    _write(tmp / "data" / "de.jsonl", "")
    return ["--tasks", task, "--data", data], ["empty", "de"]


def case_empty_json_list(tmp, model):
    task, _ = toy(tmp)
    for lang in ("en", "de"):
        _write(tmp / "json" / f"{lang}.json", "[]")
    return ["--tasks", task, "--data", str(tmp / "json" / "{lang}.json")], ["empty"]


def case_unknown_model(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--model", str(tmp / "no-such-model")], ["cannot load model"]


def case_folder_that_is_no_model(tmp, model):
    task, data = toy(tmp)
    (tmp / "empty-model").mkdir()
    return ["--tasks", task, "--data", data, "--model", str(tmp / "empty-model")], ["cannot load model"]


def case_label_mode_the_task_lacks(tmp, model):
    _, data = toy(tmp)
    task = write_task(tmp / "task2", labels={"english": {"positive": "positive", "negative": "negative"}})
    return ["--tasks", task, "--data", data, "--labels", "agnostic"], ["no label mode 'agnostic'"]


def case_unknown_label_mode(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--labels", "english,klingon"], ["unknown label mode 'klingon'"]


def case_native_words_missing(tmp, model):
    from toydata import task_dict
    raw = task_dict()
    raw["languages"]["de"]["native"] = {}
    _, data = toy(tmp)
    task = write_task(tmp / "task3", languages=raw["languages"])
    return ["--tasks", task, "--data", data, "--labels", "native"], ["no native label words", "'de'"]


def case_bad_limit(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--limit", "0"], ["--limit"]


# ----------------------------------------------------------------------------- issue 14: tracebacks and late messages
_EARLIER = set(globals())


def _task_with(tmp, **changes) -> str:
    """The toy task file with some keys changed, or with the English template replaced (template=...)."""
    from toydata import task_dict
    raw = task_dict()
    template = changes.pop("template", None)
    if template is not None:
        raw["languages"]["en"]["template"] = template
    demos = changes.pop("en_demos", None)
    if demos is not None:
        raw["languages"]["en"]["demos"] = demos
    return write_task(tmp / "badtask", languages=raw["languages"], **changes)


def _bad_task_case(**changes):
    def case(tmp, model):
        task = _task_with(tmp, **changes)
        _, data = toy(tmp)
        return ["--tasks", task, "--data", data], [f"task file {task}:", *expect]
    expect = changes.pop("expect")
    return case


# A template without its answer cue rendered the demos as `Answer:negative"` (accuracy 1.0 -> 0.5, silently).
case_task_template_without_answer_cue = _bad_task_case(template="Review: {review}\nAnswer:",
                                                       expect=["answer cue", "'\"'"])
case_task_template_unclosed_brace = _bad_task_case(template="Review: {review\nAnswer: \"", expect=["malformed"])
case_task_template_empty_placeholder = _bad_task_case(template="Review: {}\nAnswer: \"",
                                                      expect=["placeholder {}", "names no field"])
case_task_template_conversion = _bad_task_case(template="Review: {review!x}\nAnswer: \"", expect=["{review!x}"])
case_task_template_unknown_placeholder = _bad_task_case(template="Review: {review} {stars}\nAnswer: \"",
                                                        expect=["{stars}", "names no field"])
case_task_shots_not_a_number = _bad_task_case(shots="two", expect=["shots", "'two'"])
case_task_classes_not_a_list = _bad_task_case(classes=5, expect=["classes", "5"])
case_task_demo_given_as_a_string = _bad_task_case(en_demos=["I love it.", "It broke at once."],
                                                  expect=["language en", "demo 1"])


def case_fp16_on_cpu(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--dtype", "fp16"], ["fp16", "CPU"]


def case_empty_label_list(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--labels", ""], ["no label mode"]


def case_empty_task_list(tmp, model):
    _, data = toy(tmp)
    return ["--tasks", "", "--data", data], ["no task given"]


def case_empty_language_list(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--langs", " , "], ["no language given"]


def _adapter(tmp, config, weights: bool) -> Path:
    folder = tmp / "adapter"
    _write(folder / "adapter_config.json", config)
    if weights:
        _write(folder / "adapter_model.safetensors", "")
    return folder


def case_adapter_config_empty(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--adapter", _adapter(tmp, "{}", True)], ["not a PEFT adapter config"]


def case_adapter_without_weights(tmp, model):
    task, data = toy(tmp)
    config = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                         "task_type": "CAUSAL_LM"})
    return ["--tasks", task, "--data", data, "--adapter", _adapter(tmp, config, False)], ["has no weights"]


def case_cuda_on_a_cpu_only_torch(tmp, model):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU")
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--device", "cuda"], ["--device cuda", "no CUDA"]


def case_max_length_zero(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--max-length", "0"], ["--max-length", "positive"]


def case_batch_tokens_zero(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--batch-tokens", "0"], ["--batch-tokens", "positive"]


def case_batch_tokens_negative(tmp, model):
    task, data = toy(tmp)
    return ["--tasks", task, "--data", data, "--batch-tokens", "-5"], ["--batch-tokens", "positive"]


def case_data_folder_in_no_known_layout(tmp, model):
    _write(tmp / "mydata" / "amazon_en.jsonl", _jsonl(records("en")))
    return ["--tasks", "amazon_polarity", "--data", tmp / "mydata"], [
        "no amazon_polarity data in a known layout", "amazon_polarity/<lang>.jsonl", "save_to_disk",
        "ap_emotion/emotion_en500_test.json", "{lang}"]



for _name, _case in list(globals().items()):  # the task cases are made by _bad_task_case: name them
    if _name.startswith("case_"):
        _case.__name__ = _name
# Cases that were tracebacks, or found only after the model had loaded (issue 14).
LATE_CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_") and k not in _EARLIER]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, tiny_llama_path, capsys, case):
    argv, fragments = case(tmp_path, tiny_llama_path)
    if "--model" not in argv:
        argv = ["--model", tiny_llama_path, *argv]
    if "--langs" not in argv:
        argv = ["--langs", "en,de", *argv]
    out = tmp_path / "out"
    assert evaluate(*argv, "--output", out) == 2
    line = one_error_line(capsys)
    for f in fragments:
        assert f in line, (f, line)
    assert not out.exists()  # nothing half-written, no folder claimed


def test_unknown_scoring_rule(tmp_path, tiny_llama_path, capsys):
    task, data = toy(tmp_path)
    with pytest.raises(SystemExit) as exc:
        evaluate("--model", tiny_llama_path, "--tasks", task, "--data", data, "--scoring", "vibes",
                 "--output", tmp_path / "out")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--scoring" in err and "vibes" in err
    assert not (tmp_path / "out").exists()


def test_output_folder_with_other_settings(tmp_path, tiny_llama_path, capsys):
    task, data = toy(tmp_path)
    out = tmp_path / "out"
    base = ["--tasks", task, "--data", data, "--langs", "en", "--limit", "2", "--output", out]
    # A typo in --model must not claim the folder for the bad name.
    assert evaluate("--model", tmp_path / "typo", *base) == 2
    capsys.readouterr()
    assert evaluate("--model", tiny_llama_path, *base) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.rglob("*"))

    assert evaluate("--model", tiny_llama_path, *base, "--scoring", "first-token") == 2
    line = one_error_line(capsys)
    assert "other settings" in line and "scoring" in line and "first-token" in line

    other = tmp_path / "other-model"
    other.symlink_to(tiny_llama_path)  # the same weights under another name is another run
    assert evaluate("--model", other, *base) == 2
    line = one_error_line(capsys)
    assert "other settings" in line and "model" in line
    assert sorted(p.name for p in out.rglob("*")) == before

    # The same settings resume fine (and more languages may join the folder).
    assert evaluate("--model", tiny_llama_path, *base) == 0


def test_output_is_a_file(tmp_path, tiny_llama_path, capsys):
    task, data = toy(tmp_path)
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert evaluate("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en,de",
                    "--output", out) == 2
    assert "is a file" in one_error_line(capsys)


@pytest.mark.slow
def test_real_process_prints_no_traceback(tmp_path, tiny_llama_path):
    """The installed entry point, as a user runs it: a malformed line is one line on stderr, exit 2."""
    argv, fragments = case_malformed_json_line(tmp_path, tiny_llama_path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "polyalign", "evaluate", "--model", tiny_llama_path,
                           "--langs", "en,de", *argv, "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(f in proc.stderr for f in fragments)


@pytest.mark.parametrize("case", LATE_CASES, ids=[c.__name__[5:] for c in LATE_CASES])
def test_refused_before_the_model_loads(tmp_path, tiny_llama_path, capsys, monkeypatch, case):
    """Bad flags and files are found by the cheap checks: the model is never loaded for them."""
    from polyalign import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    argv, fragments = case(tmp_path, tiny_llama_path)
    monkeypatch.setattr(models, "load_model", no_load)
    if "--langs" not in argv:
        argv = ["--langs", "en,de", *argv]
    assert evaluate("--model", tiny_llama_path, *argv, "--output", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert all(f in line for f in fragments), (fragments, line)
    assert not (tmp_path / "out").exists()


def test_duplicate_ids_are_found_before_the_model_loads(tmp_path, tiny_llama_path, capsys, monkeypatch):
    from polyalign import models
    task, data = toy(tmp_path)
    recs = records("de")
    recs[5]["id"] = recs[2]["id"]
    _write(tmp_path / "data" / "de.jsonl", _jsonl(recs))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert evaluate("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en,de",
                    "--output", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "not unique" in line and recs[2]["id"] in line and "/de" in line


def test_nan_score_never_becomes_a_prediction(tmp_path, tiny_llama_path, capsys, monkeypatch):
    """A score that overflowed to NaN is refused, naming the item; no sample records it."""
    from polyalign.evaluation import scoring
    from polyalign.errors import PolyalignError

    with pytest.raises(PolyalignError, match=r"snli/en item 'x7'.*NaN"):
        scoring.decide([float("nan"), 0.2, 0.1], "snli/en item 'x7'")
    assert scoring.decide([0.1, 0.3, 0.3]) == (1, True)

    real = scoring.Scorer.score

    def nan_on_r03(self, group, batch, states=None):
        out = real(self, group, batch, states)
        for i, res in zip(batch, out):
            if group.items[i].item["id"] == "r03":
                res["scores"] = [float("nan")] * len(res["scores"])
        return out
    monkeypatch.setattr(scoring.Scorer, "score", nan_on_r03)
    task, data = toy(tmp_path)
    out = tmp_path / "out"
    assert evaluate("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en",
                    "--output", out) == 2
    line = one_error_line(capsys)
    assert "item 'r03'" in line and "NaN" in line and "toy_polarity/english/en" in line
    samples = out / "samples" / "toy_polarity" / "english" / "en.jsonl"
    assert not samples.exists() or "NaN" not in samples.read_text()


def test_read_only_output_is_one_line(tmp_path, tiny_llama_path, capsys, monkeypatch):
    import errno

    from polyalign.evaluation import evaluate as ev
    task, data = toy(tmp_path)

    def read_only(path, records):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(ev, "append_lines", read_only)
    assert evaluate("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en",
                    "--output", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert os.strerror(errno.EROFS) in line and str(tmp_path / "out" / "samples") in line


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_output_under_proc_is_one_line(tmp_path, tiny_llama_path, capsys):
    task, data = toy(tmp_path)
    assert evaluate("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en",
                    "--output", "/proc/polyalign-x") == 2
    assert "/proc/polyalign-x" in one_error_line(capsys)


def test_unknown_hub_id_offline_is_quick_and_one_line(tmp_path, capsys):
    """Without a network the hub client retried for about a minute, printing each retry; the cache is
    asked alone now. (With a network the hub answers 404 at once: one line too.)"""
    import time
    task, data = toy(tmp_path)
    import transformers  # noqa: F401 - imported before the clock starts: its import alone takes seconds
    started = time.time()
    assert evaluate("--model", "polyalign-no-such-org/no-such-model-0", "--tasks", task, "--data", data,
                    "--langs", "en", "--output", tmp_path / "out") == 2
    assert time.time() - started < 20
    assert "cannot load model 'polyalign-no-such-org/no-such-model-0'" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_no_progress_silences_loading_bars_and_restores_them(tmp_path, tiny_llama_path, capsys):
    from transformers.utils import logging as hf_logging
    task, data = toy(tmp_path)
    before = hf_logging.is_progress_bar_enabled()
    assert evaluate("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en", "--limit", "2",
                    "--output", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert hf_logging.is_progress_bar_enabled() == before

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

"""store: whole-line appends under short writes and a full disk, atomic writes of files and folders that
name their file, file-safe names, CSV files, and the claim of an output folder."""
from __future__ import annotations

import errno
import os

import pytest

from polyalign import store


def test_append_lines_finishes_a_short_write(tmp_path, monkeypatch):
    """os.write may write fewer bytes than asked (seen on a nearly full disk: 8,192 of 8,812)."""
    real = os.write
    monkeypatch.setattr(store.os, "write", lambda fd, data: real(fd, bytes(data[:100])))
    records = [{"id": f"x{i}", "text": "y" * 50} for i in range(40)]
    path = tmp_path / "s.jsonl"
    store.append_lines(path, records)
    assert store.read_jsonl(path) == records


def test_append_lines_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    real, calls = os.write, []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")   # as the kernel raises it: no file name
        return real(fd, bytes(data[:len(data) // 2]))

    monkeypatch.setattr(store.os, "write", full)
    path = tmp_path / "s.jsonl"
    with pytest.raises(OSError) as e:
        store.append_lines(path, [{"id": f"x{i}"} for i in range(10)])
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    kept = store.read_jsonl(path, repair=True)            # the whole lines written are kept, the torn one cut
    assert kept == [{"id": f"x{i}"} for i in range(len(kept))] and len(kept) < 10
    assert path.read_bytes().endswith(b"\n")


def test_write_atomic_on_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    path = tmp_path / "results.json"
    with pytest.raises(OSError) as e:
        store.write_json(path, {"a": 1})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "fig.png"
    store.write_atomic(path, b"old")
    with pytest.raises(RuntimeError):
        with store.atomic_path(path) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path     # savefig reads the format from it
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer broke")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]
    with store.atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]


def test_atomic_folder_replaces_or_merges_and_leaves_the_old_one_after_an_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with store.atomic_folder(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
    with store.atomic_folder(out, tmp=out / ".adapter.tmp", merge=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt", "old.txt"]
    with store.atomic_folder(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["sub"]


def test_safe_name_gives_what_each_slug_it_replaced_gave():
    """The regular expressions that lens, prepare, report and experiment used before (the reference)."""
    import random
    import re
    rng = random.Random(0)
    alphabet = "aZ09._-+ /ü日_"
    for _ in range(500):
        x = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert store.safe_name(x, keep=r"\w.+-", fallback="adapter") == (re.sub(r"[^\w.+-]+", "_", x) or "adapter")
        assert store.safe_name(x, fallback="polyalign") == (re.sub(r"[^A-Za-z0-9_.-]+", "_", x) or "polyalign")
        assert store.safe_name(x, "-", strip=True) == re.sub(r"[^A-Za-z0-9._-]+", "-", x).strip("-")
        assert store.safe_name(x, "-", strip=True, fallback="model") == \
            (re.sub(r"[^A-Za-z0-9._-]+", "-", x).strip("-") or "model")


def test_write_csv_formats_floats_only_when_asked(tmp_path):
    import csv
    import math

    import numpy as np
    rows = [["a", 1, 0.1234567, np.float32(2.5), np.float64("nan"), float("inf"), np.int64(3), None]]
    store.write_csv(tmp_path / "raw.csv", ["s", "i", "f", "f32", "nan", "inf", "i64", "none"], rows)
    store.write_csv(tmp_path / "fmt.csv", ["s", "i", "f", "f32", "nan", "inf", "i64", "none"], rows, ".6g")
    read = lambda name: list(csv.reader((tmp_path / name).open(encoding="utf-8", newline="")))  # noqa: E731
    assert read("raw.csv")[1] == [str(v) if v is not None else "" for v in rows[0]]
    expect = [v if not isinstance(v, (float, np.floating)) else "" if not math.isfinite(v) else format(float(v), ".6g")
              for v in rows[0]]
    assert read("fmt.csv")[1] == [str(v) if v is not None else "" for v in expect]
    assert (tmp_path / "fmt.csv").read_bytes().count(b"\r") == 0


def test_claim_output_words_each_command_s_refusal(tmp_path):
    """One claim for evaluate (run.json), train (config.yaml) and prepare (manifest.json), each in its own words."""
    from polyalign.errors import PolyalignError
    from polyalign.training.prepare import PREPARED_SET
    from polyalign.training.train import TRAINING_RUN

    def refusal(folder, kind, settings):
        with pytest.raises(PolyalignError) as e:
            store.claim_output(folder, kind, settings)
        return str(e.value)

    assert store.claim_output(tmp_path / "new", TRAINING_RUN, {"lr": 1}) is None
    (tmp_path / "file").write_text("x")
    assert refusal(tmp_path / "file", PREPARED_SET, {}) == f"--output {tmp_path / 'file'} is a file, not a folder"

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert refusal(junk, TRAINING_RUN, {}) == \
        f"--output {junk} is not empty and holds no polyalign training run; choose another"
    assert refusal(junk, PREPARED_SET, {}) == \
        f"--output {junk} is not empty and holds no prepared set; choose another folder"
    assert store.claim_output(junk, store.RunRecord("run.json"), {}) is None     # evaluate writes beside others

    run = tmp_path / "train"
    run.mkdir()
    (run / "config.yaml").write_text("lr: 0.5\ndevice: cpu\n")
    # (train passes its settings without the non-semantic keys, such as the device, which the record has)
    assert store.claim_output(run, TRAINING_RUN, {"lr": 0.5}) == {"lr": 0.5, "device": "cpu"}
    assert refusal(run, TRAINING_RUN, {"lr": 0.1}) == \
        f"{run} already holds a different run (lr: 0.5 there, 0.1 now); choose another --output"
    assert refusal(run, TRAINING_RUN, {"lr": 0.5, "seed": 1}) == \
        f"{run} already holds a different run (seed: None there, 1 now); choose another --output"
    (run / "config.yaml").write_text("lr: [0.5\n")
    assert refusal(run, TRAINING_RUN, {}) == f"{run / 'config.yaml'} is damaged; choose another --output"

    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "run.json").write_text('{"model": "m", "old": 1}')
    assert store.claim_output(ev, store.RunRecord("run.json"), {"model": "m", "new": 2}) == {"model": "m", "old": 1}
    assert refusal(ev, store.RunRecord("run.json"), {"model": "n"}) == \
        f"{ev} holds a run with other settings (model: 'm' there, 'n' now); choose another --output"
    (ev / "run.json").write_text("{")
    assert refusal(ev, store.RunRecord("run.json"), {}) == \
        f"{ev / 'run.json'} is damaged; delete it (and the samples beside it) or choose another --output"
    (ev / "run.json").write_text("[1]")
    assert refusal(ev, store.RunRecord("run.json"), {}) == \
        f"{ev / 'run.json'} is not a polyalign run record; choose another --output"

    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "manifest.json").write_text('{"settings": {"sources": ["zh"]}, "data_hash": "h"}')
    assert store.claim_output(prep, PREPARED_SET, {"sources": ["zh"]})["data_hash"] == "h"
    assert refusal(prep, PREPARED_SET, {"sources": ["de"]}) == (f"{prep} already holds a different prepared set "
                                                                f"(sources: ['zh'] there, ['de'] now); choose another --output")
    (prep / "manifest.json").write_bytes(b"\xff{")
    assert refusal(prep, PREPARED_SET, {}) == f"{prep / 'manifest.json'} is damaged; choose another --output"

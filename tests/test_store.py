"""store: whole-line appends under short writes and a full disk, atomic writes that name their file."""
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

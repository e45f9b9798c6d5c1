"""Crash-safe files: whole-line appends, atomic JSON writes, tolerant JSONL reads, run fingerprints."""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

from polyalign.errors import PolyalignError


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def append_lines(path: Path, records: list[dict]) -> None:
    """Append records as JSON lines in one write() on an O_APPEND descriptor, then fsync.
    A kill leaves either all of them or none (a torn tail is dropped by read_jsonl)."""
    if not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = memoryview("".join(dumps(r) + "\n" for r in records).encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # os.write may write less than asked (a nearly full disk): write the rest, and fail with the
        # file's name rather than leave the tail unwritten. A torn last line is dropped by read_jsonl.
        while data:
            n = os.write(fd, data)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            data = data[n:]
        os.fsync(fd)
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        os.close(fd)


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL file we wrote; a torn last line (from a kill) is ignored, or cut with repair."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if repair and end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for n, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise PolyalignError(f"{path}:{n}: malformed JSON line; delete the file to recompute it") from None
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a full disk fails in write/flush, which name no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(dumps(r) + "\n" for r in records))


def content_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _read_fingerprint(path: Path) -> dict:
    try:
        old = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PolyalignError(f"{path} is damaged; delete it (and the samples beside it) or choose "
                             f"another --output") from None
    if not isinstance(old, dict):
        raise PolyalignError(f"{path} is not a polyalign run record; choose another --output")
    return old


def check_fingerprint(folder: Path, name: str, settings: dict, record: bool = True) -> None:
    """Refuse to resume into a folder that holds a run with other settings; record them otherwise
    (with record=False only check, e.g. before the model has loaded or on every process)."""
    path = folder / name
    if folder.exists() and not folder.is_dir():
        raise PolyalignError(f"--output {folder} is a file, not a folder")
    if path.exists():
        old = _read_fingerprint(path)
        for key in sorted(set(old) | set(settings)):
            if key in old and key in settings and old[key] != settings[key]:
                raise PolyalignError(f"{folder} holds a run with other settings ({key}: {old[key]!r} there, "
                                     f"{settings[key]!r} now); choose another --output")
        merged = {**old, **settings}
        if record and merged != old:
            write_json(path, merged)
    elif record:
        write_json(path, settings)

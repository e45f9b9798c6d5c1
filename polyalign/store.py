"""Crash-safe files: whole-line appends, atomic writes of files and folders, tolerant JSONL reads,
CSV files, file-safe names, and the claim of an output folder by a run (its fingerprint)."""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file name beside `path`, for writers that want a name or a file of their own
    (np.savez, savefig, safetensors): once the block has written it, it is fsynced and renamed over
    `path`, so `path` holds the old bytes or the new ones, never a part. After an error the
    temporary file is removed. The name keeps the suffix, from which savefig takes the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a full disk fails in write/fsync, which name no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write text (as UTF-8) or bytes to a temporary file beside `path`, fsync, then rename over it."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_folder(path: Path, tmp: Path | None = None, merge: bool = False) -> Iterator[Path]:
    """A fresh temporary folder (beside `path` unless `tmp` is given) to build a whole folder in;
    once the block has written it, it takes the place of `path` (see `publish_folder`). After an
    error it is removed and `path` stays as it was."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish_folder(tmp, path, merge)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(tmp: Path, path: Path, merge: bool = False) -> None:
    """Make the folder built at `tmp` appear at `path`: its files are fsynced, then `tmp` is renamed
    over `path` (removed first), or with `merge` its files are moved into `path` one by one (each
    rename atomic), beside what `path` holds already."""
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    if merge:
        path.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
        tmp.rmdir()
    else:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(dumps(r) + "\n" for r in records))


def content_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def write_csv(path: Path, header: list[str], rows: list[list], float_format: str | None = None) -> None:
    """A CSV file ("\\n" line ends), written atomically. With `float_format` (such as ".6g") floats
    are written in that format and non-finite ones as empty cells; otherwise as str() writes them."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(row if float_format is None else [_format_float(v, float_format) for v in row])
    write_atomic(Path(path), buf.getvalue())


def _format_float(v, spec: str):
    import numpy as np
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else format(float(v), spec)
    return v


ASCII_NAME = "A-Za-z0-9._-"      # the characters of a portable file name (a regex class)


def safe_name(text: str, sep: str = "_", *, keep: str = ASCII_NAME, strip: bool = False, fallback: str = "") -> str:
    """`text` as one file-name component: each run of characters outside `keep` (the body of a
    regex character class) becomes `sep`; `strip` then drops `sep` at both ends; an empty result
    becomes `fallback`."""
    name = re.sub(f"[^{keep}]+", sep, text)
    return (name.strip(sep) if strip else name) or fallback


# ----------------------------------------------------------------------------- claiming an output folder
@dataclass(frozen=True)
class RunRecord:
    """How a command records its run in its output folder, and how a clash with another run reads."""
    name: str                                        # the file that holds the settings: run.json, config.yaml
    clash: str = "holds a run with other settings"   # "<folder> <clash> (key: a there, b now); choose another --output"
    damaged: str = "delete it (and the samples beside it) or choose another --output"   # "<record> is damaged; ..."
    foreign: str | None = None   # refuse a non-empty folder without the record: "--output X is not empty and holds no ..."
    parse: Callable[[str], object] = json.loads      # text -> record; raises ValueError when damaged
    settings_of: Callable[[dict], dict] = lambda record: record
    all_keys: bool = False       # compare every key (a missing one reads as None), not only those both sides have


def claim_output(folder: Path, kind: RunRecord, settings: dict) -> dict | None:
    """Check, before anything is written, that this run may use `folder`: refuse a file, a folder
    whose record holds other settings, and (with kind.foreign) a non-empty folder without a record.
    Returns the record found there (a run of these settings, to resume or to reuse), else None."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PolyalignError(f"--output {folder} is a file, not a folder")
    path = folder / kind.name
    if not path.is_file():
        if kind.foreign and folder.is_dir() and any(folder.iterdir()):
            raise PolyalignError(f"--output {folder} is not empty and holds no {kind.foreign}")
        return None
    try:
        old = kind.parse(path.read_text("utf-8"))
    except ValueError:      # malformed JSON (or YAML, as the parser reports it), or bytes that are no UTF-8
        raise PolyalignError(f"{path} is damaged; {kind.damaged}") from None
    if not isinstance(old, dict):
        raise PolyalignError(f"{path} is not a polyalign run record; choose another --output")
    there = kind.settings_of(old)
    keys = set(there) | set(settings) if kind.all_keys else set(there) & set(settings)
    for key in sorted(keys):
        if there.get(key) != settings.get(key):
            raise PolyalignError(f"{folder} {kind.clash} ({key}: {there.get(key)!r} there, "
                                 f"{settings.get(key)!r} now); choose another --output")
    return old


def check_fingerprint(folder: Path, name: str, settings: dict, record: bool = True) -> None:
    """Refuse to resume into a folder that holds a run with other settings; record them otherwise
    (with record=False only check, e.g. before the model has loaded or on every process)."""
    old = claim_output(folder, RunRecord(name), settings)
    if old is None:
        if record:
            write_json(folder / name, settings)
        return
    merged = {**old, **settings}
    if record and merged != old:
        write_json(folder / name, merged)

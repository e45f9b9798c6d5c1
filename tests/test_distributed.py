"""Two CPU processes (`torchrun --nproc_per_node 2 -m polyalign evaluate`) give one results file and
the same samples as a single process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toydata import toy

from polyalign import cli

pytestmark = pytest.mark.slow      # multi-process: not in `make test-fast`


def _samples(out: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(out)): [json.loads(x) for x in p.read_text("utf-8").splitlines()]
            for p in sorted((out / "samples").rglob("*.jsonl"))}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path, tiny_llama_path):
    # torchrun, not `accelerate launch --cpu --num_processes 2`: accelerate 1.x runs that as ONE process
    # unless a multi-CPU config (mpirun) is set up. Under torchrun polyalign asks accelerate for gloo.
    launcher = Path(sys.executable).with_name("torchrun")
    if not launcher.exists():
        pytest.skip("torchrun is not installed beside this Python")
    task, data = toy(tmp_path)
    common = ["evaluate", "--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en,de",
              "--labels", "english,native", "--dtype", "fp32", "--device", "auto", "--batch-tokens", "160",
              "--no-progress"]
    single = tmp_path / "single"
    assert cli.main([*common, "--output", str(single)]) == 0

    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(launcher), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                           "-m", "polyalign", *common, "--output", str(multi)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1  # rank 0 alone reports

    # One results file, no per-rank leftovers, every item counted once.
    files = sorted(str(p.relative_to(multi)) for p in multi.rglob("*") if p.is_file())
    assert files == sorted(["results.json", "run.json", *_samples(single)]), files
    results = json.loads((multi / "results.json").read_text("utf-8"))
    reference = json.loads((single / "results.json").read_text("utf-8"))
    assert [(r["lang"], r["labels"], r["n"], r["acc"]) for r in results["rows"]] == \
        [(r["lang"], r["labels"], r["n"], r["acc"]) for r in reference["rows"]]
    # The work was shared: rank 0 scored only part of the 48 items itself.
    assert 0 < results["timing"]["items_scored"] < 48

    got, want = _samples(multi), _samples(single)
    assert list(got) == list(want)
    for name in want:
        assert [s["id"] for s in got[name]] == [s["id"] for s in want[name]]
        for a, b in zip(got[name], want[name]):
            assert a["pred"] == b["pred"] and a["prompt"] == b["prompt"] and a["gold"] == b["gold"]
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)

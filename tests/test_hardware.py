"""The CPU as torch's kernels see it: capped ISAs are honoured, and results.json names the machine."""
import json
import os
import subprocess
import sys

import pytest

from polyalign import hardware


def test_onednn_cap_turns_native_bf16_off(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not hardware.native_bf16()
    assert hardware.cpu_class() != "avx512_bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")
    native = "avx512_bf16" in hardware.cpu_flags() or "amx_bf16" in hardware.cpu_flags()
    assert hardware.native_bf16() == (native and hardware.aten_capability().startswith("AVX512"))


def test_aten_cap_is_what_torch_dispatches_to():
    """ATEN_CPU_CAPABILITY=default makes torch's kernels scalar: hardware must report it so."""
    code = "from polyalign import hardware; print(hardware.aten_capability(), hardware.native_bf16())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}).stdout.split()
    assert out == ["DEFAULT", "False"]


def test_auto_dtype_follows_native_bf16(monkeypatch):
    import torch
    from polyalign.models import resolve_dtype
    want = torch.bfloat16 if hardware.native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == want
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_bf16_without_native_support_warns_in_one_line(monkeypatch, caplog):
    import torch
    from polyalign.models import resolve_dtype
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with caplog.at_level("WARNING"):
        assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    lines = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_results_record_the_machine_and_fast_paths(tmp_path, tiny_llama_path, dtype):
    from polyalign.cli import main
    out = tmp_path / "run"
    assert main(["evaluate", "--model", tiny_llama_path, "--langs", "en", "--limit", "4", "--dtype", dtype,
                 "--device", "cpu", "--output", str(out), "--no-progress"]) == 0
    machine = json.loads((out / "results.json").read_text("utf-8"))["machine"]
    assert {k: machine[k] for k in hardware.describe()} == hardware.describe()
    assert machine["packed_rows"] and machine["per_item_attention"]
    assert machine["prepacked_linears"] == (dtype == "bf16" and hardware.native_bf16())

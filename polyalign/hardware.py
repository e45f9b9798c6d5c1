"""What the CPU offers the kernels torch will pick: whether bf16 is native, and what results record.

torch and oneDNN can be told to use fewer instructions than the CPU has (`ATEN_CPU_CAPABILITY=avx2`,
`ONEDNN_MAX_CPU_ISA=AVX2`); CI uses that to run an avx512_bf16 machine as an AVX2-only one. Everything
here honours both, so `dtype auto`, the tests' skip reasons and results.json see the CPU as the kernels do.
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# oneDNN ISA caps, weakest first (its documentation's order); bf16 dot products from AVX512_CORE_BF16 on.
_ONEDNN_ISAS = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def aten_capability() -> str:
    """The vector ISA torch's own CPU kernels dispatch to ('AVX512', 'AVX2', 'DEFAULT', ...)."""
    import torch
    return torch.backends.cpu.get_cpu_capability()


def onednn_cap() -> str | None:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.upper() if cap else None


def _onednn_allows_bf16() -> bool:
    cap = onednn_cap()
    if cap in (None, "ALL", "DEFAULT"):
        return True
    return cap in _ONEDNN_ISAS and _ONEDNN_ISAS.index(cap) >= _ONEDNN_ISAS.index("AVX512_CORE_BF16")


def native_bf16() -> bool:
    """bf16 matmuls run natively (avx512_bf16 or AMX, and neither torch nor oneDNN is capped below
    them): there bf16 is about 2x faster than fp32; elsewhere it is emulated, often 100x slower."""
    flags = cpu_flags()
    hw = "avx512_bf16" in flags or "amx_bf16" in flags
    return hw and aten_capability().startswith("AVX512") and _onednn_allows_bf16()


def cpu_class() -> str:
    """One phrase for messages and skip reasons: 'avx512_bf16', 'AVX-512 without bf16', 'AVX2-only', ..."""
    if native_bf16():
        return "avx512_bf16"
    cap = aten_capability()
    if cap.startswith("AVX512"):
        return "AVX-512 without native bf16" if _onednn_allows_bf16() else "AVX-512 capped by ONEDNN_MAX_CPU_ISA"
    if cap == "AVX2":
        return "AVX2-only"
    return f"{platform.machine()} ({cap})"


def describe(device=None) -> dict:
    """What results.json records of the machine, so a reader can tell why two machines' digits differ."""
    out = {"cpu": cpu_model(), "machine": platform.machine(), "aten_capability": aten_capability(),
           "onednn_max_isa": onednn_cap(), "native_bf16": native_bf16(), "cpu_class": cpu_class()}
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch
        out["gpu"] = torch.cuda.get_device_name(device)
    return out

"""What CPU a figure was measured on.

The machines this project runs on change from one day to the next (AVX-512
one day, AVX2-only the next), and the model's speed differs by more than 2x
between them, so no images/s figure is printed without the CPU model and the
vector flags that explain it. `plan` and the benchmarks share these.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

# The flags that decide the model's speed: AVX2 (256-bit FMA), AVX-512 (512-bit),
# and the two with which oneDNN runs bfloat16 fast (see `--precision`).
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo(text: Optional[str]) -> str:
    if text is not None:
        return text
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:  # not Linux: no flags, and the model from `platform`
        return ""


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """The CPU's model name (e.g. `AMD EPYC`), as /proc/cpuinfo gives it."""
    for line in _cpuinfo(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def vector_flags(cpuinfo: Optional[str] = None) -> list[str]:
    """Those of VECTOR_FLAGS the CPU has, in VECTOR_FLAGS' order."""
    for line in _cpuinfo(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return [flag for flag in VECTOR_FLAGS if flag in present]
    return []


def describe_cpu(cpuinfo: Optional[str] = None) -> str:
    """One line: model, vCPUs and each vector flag present or not."""
    flags = vector_flags(cpuinfo)
    marks = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in VECTOR_FLAGS)
    return f"{cpu_model(cpuinfo)}, {os.cpu_count() or 1} vCPUs ({marks})"


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy (/proc/stat):
    a measurement taken while others use the cores can say so."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

"""Device, precision and threads: decided here, in one place, and recorded in manifests.

``auto`` precision picks bf16 autocast only where the hardware computes bf16 natively (CUDA with
bf16, or an x86 CPU with AVX-512 BF16 / AMX) and the model is big enough for matmuls to dominate;
elsewhere bf16 is emulated and slower than fp32.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

from ...config import DEVICES, PRECISIONS  # noqa: F401  (the choices live with the option; re-exported)
from ...config import threads_problem
from ...errors import UserError

# Below this many parameters a step is dominated by overheads, not matmuls, and bf16 does not pay.
BF16_MIN_PARAMS = 1_000_000


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def machine_info() -> dict:
    """What a benchmark or manifest records about the machine."""
    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "isa": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c", "asimd", "sve")),
    }


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise UserError(f"unknown --device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to this torch build; use --device cpu")
    return device


def resolve_precision(precision: str, device: str, n_params: int) -> str:
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16-mixed" if cpu_has_native_bf16() and n_params >= BF16_MIN_PARAMS else "fp32"


def autocast(device: str, precision: str):
    import contextlib

    import torch

    if precision == "bf16-mixed":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(threads: int | None) -> int:
    import torch

    if threads is not None:
        problem = threads_problem(threads)
        if problem:
            raise UserError(problem)
        torch.set_num_threads(threads)
    return torch.get_num_threads()

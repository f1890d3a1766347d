"""Which int8 scheme to use on the CPU this runs on.

ONNX Runtime's CPU kernels (MLAS) multiply uint8 activations by int8 weights with VPMADDUBSW on
x86 without VNNI; that instruction adds pairs of products into int16 and can saturate, so ORT
recommends u8s8 with ``reduce_range`` (7-bit weights) there. With VNNI (VPDPBUSD accumulates into
int32) or on ARM (SDOT/UDOT) there is no saturation, and s8s8 in QDQ format is ORT's first choice.
The choice is recorded in the manifest with the reason; ``--scheme`` and ``--reduce-range`` override it.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

from bigmodel_cli.errors import UserError

SCHEMES = ("auto", "u8s8", "s8s8", "u8u8")
_TYPES = {"u8s8": ("uint8", "int8"), "s8s8": ("int8", "int8"), "u8u8": ("uint8", "uint8")}
_VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}
_AVX512 = {"avx512f", "avx512bw"}


@dataclass
class Scheme:
    name: str  # u8s8 | s8s8 | u8u8: activation and weight element types
    activation_type: str  # "uint8" or "int8"
    weight_type: str
    reduce_range: bool  # 7-bit weights, against VPMADDUBSW saturation
    isa: str  # what was detected: vnni | avx512 | avx2 | x86 | arm | other
    reason: str
    overridden: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def detect_isa(flags: frozenset[str] | set[str], machine: str | None = None) -> str:
    """The CPU feature level that decides the int8 scheme."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return "arm"
    if machine in ("x86_64", "amd64", "i686", "i386", "x86"):
        if _VNNI & set(flags):
            return "vnni"
        if _AVX512 & set(flags):
            return "avx512"
        if "avx2" in flags:
            return "avx2"
        return "x86"
    return "other"


def choose_scheme(isa: str, scheme: str = "auto", reduce_range: bool | None = None) -> Scheme:
    """The scheme for ``isa`` (see the module docstring), with the user's overrides applied."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown --scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if isa in ("avx2", "avx512", "x86"):
        name, rr = "u8s8", True
        reason = (f"x86 without VNNI ({isa}): u8s8 with reduce_range, ONNX Runtime's recommendation "
                  "against int16 saturation in VPMADDUBSW")
    else:
        name, rr = "s8s8", False
        reason = {"vnni": "x86 with VNNI: s8s8 QDQ, no saturation (VPDPBUSD accumulates in int32)",
                  "arm": "ARM: s8s8 QDQ (SDOT/UDOT accumulate in int32)"}.get(isa, f"{isa}: s8s8 QDQ, ONNX Runtime's default")
    overridden = []
    if scheme != "auto" and scheme != name:
        name = scheme
        overridden.append(f"--scheme {scheme}")
        # u8u8 cannot saturate; s8s8 has no VPMADDUBSW path: reduce_range only helps u8s8.
        rr = rr and scheme == "u8s8"
    if reduce_range is not None and reduce_range != rr:
        rr = reduce_range
        overridden.append("--reduce-range" if reduce_range else "--no-reduce-range")
    if overridden:
        reason += "; overridden by " + " ".join(overridden)
    activation, weight = _TYPES[name]
    return Scheme(name, activation, weight, rr, isa, reason, overridden)

"""How a PyTorch module becomes an ONNX file: the dynamo exporter first, TorchScript if it fails,
and the file laid out as ``model.onnx`` alone or with exactly one ``model.onnx.data``.

``export.py`` runs the whole command (validation, verification, the artifact); this module only
turns a module and an example input into a file, quietly, and turns an exporter's multi-page
failure into one line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ... import artifact as art
from ...errors import UserError
from . import files as onnx_files
from ..core.quiet import silenced

if TYPE_CHECKING:
    from .layout import ExportOptions, IOLayout

INPUT_NAME, OUTPUT_NAME = "input", "logits"
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's newest opset
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Weights above this many bytes are saved as external data (model.onnx.data beside model.onnx).
# Protobuf cannot serialize a message of 2 GiB or more, and the graph, names and any constants the
# exporter folds come on top of the weights, so the line sits 128 MiB below that limit. Below it
# the model stays one file, which every ONNX client can load. This is the one place the decision is
# made: torch's own rule (ONNXProgram.save goes external above 1.5 GiB) is bypassed, and the
# TorchScript exporter's one-file-per-tensor layout is re-packed (onnx_files.place).
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3 - 128 * 1024**2


def needs_external_data(weight_bytes: int) -> bool:
    # The constant is read at call time, so a test can lower it to send tiny models down this path.
    return weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES


def weight_bytes(module) -> int:
    """Bytes of the parameters and buffers an export stores. ``parameters()`` yields a shared
    tensor once, so GPT's tied embedding and head count once, as they are stored once."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def quiet_exporters():
    """The exporters print progress to stdout and warnings to stderr; their failures are reported
    by us, in one line (``exporter_reason``)."""
    return silenced("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


def exporter_reason(exc: BaseException) -> str:
    """One line from an exporter's (often multi-page) error: the operator when one is named."""
    text = _ANSI.sub("", f"{exc}\n{exc.__cause__ or ''}")
    for pattern in (r"No ONNX function found for <OpOverload\(op='([\w.:]+)'", r"operator '([\w.:]+)'",
                    r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]"):
        match = re.search(pattern, text)
        if match:
            return f"operator {match.group(1)} has no ONNX conversion"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("-", "#", "<"))]
    summary = next((ln for ln in lines if "Error" in ln or "error" in ln), lines[0] if lines else type(exc).__name__)
    return f"{type(exc).__name__}: {summary[:240]}"


def export_module(model, layout: IOLayout, dtype: str):
    """The module to trace: the model itself, or (fp16) a half-precision copy between casts so the
    file keeps float32 inputs and outputs — a client feeds it exactly like the fp32 export."""
    if dtype == "fp32":
        return model
    import copy

    import torch

    class HalfPrecision(torch.nn.Module):
        def __init__(self, inner, cast_input: bool):
            super().__init__()
            self.model = inner.half()
            self.cast_input = cast_input

        def forward(self, x):
            return self.model(x.half() if self.cast_input else x).float()

    return HalfPrecision(copy.deepcopy(model), layout.dtype == "float32").eval()


def _dynamo_export(module, example, layout: IOLayout, options: ExportOptions, path: Path, external: bool) -> None:
    import torch
    from onnxscript import ir
    from torch.export import Dim

    dims = {}
    if "batch" in layout.dynamic:
        dims[0] = Dim("batch", min=1)
    if "seq" in layout.dynamic:
        dims[1] = Dim("seq", min=1, max=layout.context)
    program = torch.onnx.export(
        module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=options.opset,
        dynamic_shapes=(dims,) if dims else None, dynamo=True, optimize=options.optimize != "none",
        external_data=False, verbose=False,
    )
    # ir.save rather than program.save, which would go external by its own 1.5 GiB rule: the
    # decision is ours (EXTERNAL_DATA_THRESHOLD_BYTES), and the data file is model.onnx.data.
    ir.save(program.model, str(path), external_data=onnx_files.data_path(path).name if external else None)


def _torchscript_export(module, example, layout: IOLayout, options: ExportOptions, path: Path, external: bool) -> None:
    import torch

    # The legacy exporter decides by itself: one file below 2 GB, and above it one file *per
    # tensor* beside ``path`` — which is why ``path`` is in a scratch directory; onnx_files.place
    # turns whatever it wrote into the layout ``external`` asks for.
    axes = {i: name for i, name in enumerate(("batch", "seq")) if name in layout.dynamic}
    torch.onnx.export(
        module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        opset_version=options.opset, dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if axes else None,
        dynamo=False, do_constant_folding=options.optimize != "none",
    )


def run_exporters(module, example, layout: IOLayout, options: ExportOptions, path: Path) -> tuple[str, str | None]:
    """dynamo first; if it fails, TorchScript. Returns (exporter used, why dynamo was not used).

    Each exporter writes into a scratch directory beside ``path`` (removed afterwards, whatever
    happens), and the result is moved to ``path`` in the canonical layout: ``model.onnx``, plus one
    ``model.onnx.data`` when the weights are over EXTERNAL_DATA_THRESHOLD_BYTES."""
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[options.exporter]
    if options.opset > TORCHSCRIPT_MAX_OPSET and "torchscript" in order[1:]:
        order = ["dynamo"]
    external = needs_external_data(weight_bytes(module))
    scratch = path.parent / ".exporter"
    failures = {}
    try:
        for name in order:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            written = scratch / path.name
            try:
                with quiet_exporters():
                    (_dynamo_export if name == "dynamo" else _torchscript_export)(module, example, layout, options,
                                                                                  written, external)
                # an exporter's folded constants can push a model over the line after all
                onnx_files.place(written, path, external or needs_external_data(onnx_files.total_bytes(written)))
                return name, (f"dynamo: {failures['dynamo']}" if failures else None)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # the exporters raise many types; each failure is summarised below
                if art.storage_problem(exc):  # a full disk is not the model's fault: say so (atomic_directory)
                    raise
                failures[name] = exporter_reason(exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
    if options.opset > TORCHSCRIPT_MAX_OPSET and options.exporter == "auto":
        detail += f" (the TorchScript exporter was not tried: it stops at opset {TORCHSCRIPT_MAX_OPSET})"
    raise UserError(f"the model cannot be exported to ONNX ({detail}); replace that operation in the model, "
                    "or try another --opset or --exporter")

"""``bigmodel export``: a PyTorch artifact → a verified ONNX artifact.

The export artifact holds ``model.onnx`` (one file while the weights are under
``exporters.EXTERNAL_DATA_THRESHOLD_BYTES``, just under protobuf's 2 GB limit; above it the weights go to
exactly one ``model.onnx.data`` beside it, whichever exporter ran — see ``files.py``),
``config.json`` (the parent's model and data sections plus an ``onnx`` section: exporter, opset,
input/output names, symbolic dimensions, dtype) and ``manifest.json`` (the same,
plus the verification figures). By default it also carries the parent's ``model.safetensors``
(and ``model.py`` for a user's model), so one directory runs on both backends and
``bigmodel eval --bench`` compares them directly; ``weights=False`` leaves a lean ONNX-only
directory for deployment.

Verification is not optional: the ONNX checker (full check, with shape inference), an ONNX
Runtime session, and a comparison with the PyTorch model on input shapes that differ from the
tracing example. A difference above ``atol`` raises WorkFailed (exit 1), and because everything is
written into ``atomic_directory`` nothing is kept.

The pieces a later stage needs (``reference_inputs``, ``compare_outputs``, ``check_onnx_file``,
``onnx_section``) are public, so ``quantize`` verifies its ONNX files the same way.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ... import artifact as art
from ...config import is_finite_number
from ...errors import ConfigErrors, UserError, WorkFailed, first_line
from ..core.progress import no_progress
from . import files as onnx_files
from .exporters import TORCHSCRIPT_MAX_OPSET, export_module, run_exporters
from .layout import ExportOptions, IOLayout

DTYPES = ("fp32", "fp16")
OPTIMIZE = ("none", "basic", "extended")
EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMIC_AXES = ("batch", "seq")
# The dynamo exporter writes opset-18 ops (e.g. Split with num_outputs) even when asked for less,
# so 18 is the floor; the TorchScript exporter stops at 20 (exporters.TORCHSCRIPT_MAX_OPSET).
MIN_OPSET = 18
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 5e-2}
def max_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


@dataclass
class ExportResult:
    path: Path
    exporter: str
    onnx: dict
    verification: dict
    manifest: dict
    fallback_reason: str | None = None


# --- inputs ------------------------------------------------------------------------------------


def io_layout(artifact: art.Artifact, dynamic: list[str] | None = None) -> IOLayout:
    data, model = artifact.data_spec, artifact.model_spec
    if artifact.task == "language-modeling":
        context = model.get("block_size") or data.get("block_size")
        if not context:
            raise UserError(f"{artifact.path}: config.json gives no block_size for this language model; re-create the artifact")
        dyn = tuple(dynamic) if dynamic is not None else ("batch", "seq")
        return IOLayout("language-modeling", (), "int64", dyn, context=int(context),
                        window=int(data.get("block_size") or context),
                        vocab_size=int(model.get("vocab_size") or data.get("vocab_size") or 256))
    shape = data.get("input_shape")
    if not shape:
        raise UserError(f"{artifact.path}: config.json gives no data input_shape; re-create the artifact")
    dyn = tuple(dynamic) if dynamic is not None else ("batch",)
    if "seq" in dyn:
        raise UserError("--dynamic seq is for language models; a classifier's only symbolic axis is batch")
    return IOLayout("classification", tuple(int(s) for s in shape), "float32", dyn)


def reference_inputs(layout: IOLayout, shapes: list[tuple[int, ...]], seed: int = 0) -> list[np.ndarray]:
    """Random inputs of the model's type: standard-normal features (the model sees normalized
    data) or token ids below the vocabulary size."""
    rng = np.random.default_rng(seed)
    if layout.task == "language-modeling":
        return [rng.integers(0, layout.vocab_size, size=s).astype(np.int64) for s in shapes]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def compare_outputs(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                    inputs: list[np.ndarray]) -> dict:
    """Largest absolute difference, the same relative to the largest reference magnitude, and how
    often the top-1 class (or next token) agrees, over all ``inputs``."""
    max_abs, max_ref, agree, total, shapes = 0.0, 0.0, 0, 0, []
    for x in inputs:
        ref = np.asarray(reference(x), dtype=np.float64)
        out = np.asarray(candidate(x), dtype=np.float64)
        shapes.append(list(x.shape))
        if ref.shape != out.shape:
            raise WorkFailed(f"verification failed: for input shape {list(x.shape)} PyTorch gives {list(ref.shape)} "
                             f"but ONNX Runtime gives {list(out.shape)}; nothing was written")
        if not np.isfinite(out).all():
            raise WorkFailed(f"verification failed: ONNX Runtime gives NaN or Inf for input shape {list(x.shape)}; nothing was written")
        max_abs = max(max_abs, float(np.abs(ref - out).max()))
        max_ref = max(max_ref, float(np.abs(ref).max()))
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += int(np.prod(ref.shape[:-1]))
    return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / max_ref if max_ref else 0.0,
            "top1_agreement": agree / total if total else 1.0, "shapes": shapes}


# --- validation ------------------------------------------------------------------------------


def validate_options(options: ExportOptions, artifact: art.Artifact) -> None:
    """Every problem with the options at once, before any work."""
    problems = []
    top = max_opset()
    if options.dtype not in DTYPES:
        problems.append(f"--dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    if options.optimize not in OPTIMIZE:
        problems.append(f"--optimize {options.optimize!r} is not one of {', '.join(OPTIMIZE)}")
    if options.exporter not in EXPORTERS:
        problems.append(f"--exporter {options.exporter!r} is not one of {', '.join(EXPORTERS)}")
    if not isinstance(options.opset, int) or not MIN_OPSET <= options.opset <= top:
        problems.append(f"--opset {options.opset} is outside the supported range {MIN_OPSET}–{top} "
                        f"(the dynamo exporter needs {MIN_OPSET}+, the installed onnx knows up to {top})")
    elif options.exporter == "torchscript" and options.opset > TORCHSCRIPT_MAX_OPSET:
        problems.append(f"--exporter torchscript supports opsets up to {TORCHSCRIPT_MAX_OPSET}, not {options.opset}")
    if options.dynamic is not None:
        unknown = [d for d in options.dynamic if d not in DYNAMIC_AXES]
        if unknown:
            problems.append(f"--dynamic {','.join(unknown)}: symbolic axes are batch and seq (or none)")
        elif "seq" in options.dynamic and artifact.task != "language-modeling":
            problems.append("--dynamic seq is for language models; a classifier's only symbolic axis is batch")
    if options.atol is not None and not (is_finite_number(options.atol) and options.atol > 0):
        problems.append(f"--atol must be a finite positive number, got {options.atol}")
    if options.device not in ("cpu", "cuda"):
        problems.append(f"--device {options.device!r} is not cpu or cuda")
    if options.optimize == "extended" and options.dtype == "fp16" and options.device == "cpu":
        problems.append("--optimize extended with --dtype fp16 needs --device cuda: on the CPU, ONNX Runtime "
                        "would bake fp32 casts into the file (use --optimize basic)")
    if problems:
        raise ConfigErrors(problems, "export options")
    if not artifact.has_weights:
        parent = (artifact.manifest.get("parent") or {}).get("path", "its parent")
        raise UserError(f"{artifact.path}: has no model.safetensors (an ONNX-only artifact); export from the PyTorch "
                        f"artifact it came from ({parent})")


# --- checks ------------------------------------------------------------------------------------


def check_onnx_file(path: Path) -> None:
    """The ONNX checker's full check (with shape inference); given the path so >2 GB models work."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise WorkFailed(f"the exported file fails the ONNX checker ({first_line(exc, 240)}); "
                         "nothing was written") from None


def _optimize_offline(path: Path, device: str, threads: int | None) -> None:
    """ONNX Runtime's extended graph optimizations, saved into the file (fusions into ORT-only ops).
    ORT writes the optimized model into a scratch directory (with its weights in a data file of
    its own when the model has external data), and it is moved back in the canonical layout."""
    from .runtime import open_session

    external = onnx_files.has_external_data(path)
    scratch = path.parent / ".optimize"
    scratch.mkdir()
    try:
        optimized = scratch / path.name
        open_session(path, device=device, threads=threads, optimization="extended", optimized_model_path=optimized,
                     optimized_external_data=onnx_files.data_path(optimized).name if external else None)
        onnx_files.place(optimized, path, external)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _prune_opset_imports(path: Path) -> None:
    """ONNX Runtime's saved graph imports every domain it knows; keep only those the nodes use, so
    other runtimes are not asked for domains the model never touches."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    used = {node.domain for node in model.graph.node} | {""}
    keep = [imp for imp in model.opset_import if imp.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.save(model, str(path))


def onnx_section(path: Path, *, exporter: str, opset: int, dtype: str, optimize: str, dynamic: tuple[str, ...]) -> dict:
    """The ``onnx`` section of config.json / manifest.json, read back from the written file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def values(items):
        out = []
        for v in items:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    inputs, outputs = values(model.graph.input), values(model.graph.output)
    symbolic = sorted({d for v in inputs + outputs for d in v["shape"] if isinstance(d, str)})
    domains = sorted({n.domain or "ai.onnx" for n in model.graph.node})
    return {
        "file": art.ONNX_FILE, "external_data": onnx_files.has_external_data(path),
        "exporter": exporter, "opset": opset, "dtype": dtype, "optimize": optimize,
        "inputs": inputs, "outputs": outputs, "dynamic": list(dynamic), "symbolic_dims": symbolic,
        "domains": domains, "portable": domains == ["ai.onnx"],
    }


def _write_decoder(model, artifact: art.Artifact, options: ExportOptions, staging: Path, device: str,
                   threads: int | None, atol: float, say) -> dict | None:
    """decoder.onnx (the graph with past key values) for a gpt/llama language model in fp32 on the
    CPU, verified for prefill and decode steps; None where it does not apply or was not asked for."""
    from .decoder import DECODER_FILE, cache_shape, decoder_section, export_decoder, supports_decoder, verify_decoder
    from .runtime import open_session

    if not (options.decoder and artifact.task == "language-modeling" and options.dtype == "fp32"
            and device == "cpu" and supports_decoder(model)):
        return None
    say("stage", name="decoder")  # over 2 GB of weights, export_decoder puts them in decoder.onnx.data
    path = staging / DECODER_FILE
    vocab = int(artifact.model_spec.get("vocab_size") or artifact.data_spec.get("vocab_size") or 256)
    export_decoder(model, path, options.opset, vocab)
    check_onnx_file(path)
    session, _ = open_session(path, device=device, threads=threads)
    figures = verify_decoder(model, session, vocab, atol)
    return {"section": decoder_section(*cache_shape(model)), "verification": figures}


# --- the command -------------------------------------------------------------------------------


def export_artifact(artifact: art.Artifact, out: Path | str, options: ExportOptions | None = None, *,
                    overwrite: bool = False, threads: int | None = None,
                    progress: Callable[..., Any] | None = None) -> ExportResult:
    """Export, check, optimize, verify and write ``out`` as a stage-"export" artifact."""
    import torch

    from ..core import hardware
    from .runtime import open_session, session_predict
    from ..core.tasks import torch_predict

    options = options or ExportOptions()
    say = progress or no_progress
    validate_options(options, artifact)
    art.check_output(out, overwrite, [artifact.path])
    device = hardware.resolve_device(options.device)
    layout = io_layout(artifact, options.dynamic)
    atol = options.atol if options.atol is not None else DEFAULT_ATOL[options.dtype]

    model = artifact.build_model().to(device)
    module = export_module(model, layout, options.dtype)
    example_np = reference_inputs(layout, [layout.trace_shape()], seed=1)[0]
    example = torch.from_numpy(example_np).to(device)

    with art.atomic_directory(out, overwrite, [artifact.path]) as staging:
        path = staging / art.ONNX_FILE
        say("stage", name="export")
        exporter, fallback = run_exporters(module, example, layout, options, path)
        say("stage", name="check")
        check_onnx_file(path)
        if options.optimize == "extended":
            say("stage", name="optimize")
            _optimize_offline(path, device, threads)
            _prune_opset_imports(path)
            check_onnx_file(path)

        say("stage", name="verify")
        session, used_threads = open_session(path, device=device, threads=threads)
        provider = session.get_providers()[0]
        torch_threads = hardware.set_threads(threads)  # --threads fixes both runtimes; None leaves torch's as it is
        figures = compare_outputs(torch_predict(model, device), session_predict(session),
                                  reference_inputs(layout, layout.verify_shapes()))
        verification = {**figures, "atol": atol, "passed": figures["max_abs_diff"] <= atol, "checker": "full",
                        "provider": provider, "reference": f"torch fp32 on {device}", "threads": used_threads,
                        "torch_threads": torch_threads}
        if not verification["passed"]:
            raise WorkFailed(
                f"verification failed: ONNX Runtime differs from PyTorch by up to {figures['max_abs_diff']:.3g} "
                f"(--atol {atol:g}, {figures['top1_agreement']:.1%} top-1 agreement); nothing was written"
            )
        del session
        decoder = _write_decoder(model, artifact, options, staging, device, threads, atol, say)

        section = onnx_section(path, exporter=exporter, opset=options.opset, dtype=options.dtype,
                               optimize=options.optimize, dynamic=layout.dynamic)
        if options.weights:
            shutil.copyfile(artifact.path / art.WEIGHTS_FILE, staging / art.WEIGHTS_FILE)
            if (artifact.path / art.MODEL_CODE_FILE).is_file():
                shutil.copyfile(artifact.path / art.MODEL_CODE_FILE, staging / art.MODEL_CODE_FILE)
        artifact.copy_tokenizer(staging)  # config.json keeps the tokenizer section
        if decoder:
            section["decoder"] = decoder["section"]
        config = {**artifact.config, "onnx": section}
        say("stage", name="write")
        manifest = art.write_metadata(
            staging, config=config, stage="export", parent=artifact,
            options={"opset": options.opset, "dynamic": list(layout.dynamic), "dtype": options.dtype,
                     "device": options.device, "optimize": options.optimize, "atol": atol,
                     "exporter": options.exporter, "weights": options.weights, "decoder": bool(decoder)},
            metrics={"verify_max_abs_diff": figures["max_abs_diff"], "verify_max_rel_diff": figures["max_rel_diff"],
                     "verify_top1_agreement": figures["top1_agreement"]},
            extra={"onnx": section, "verification": verification,
                   **({"decoder_verification": decoder["verification"]} if decoder else {}),
                   **({"exporter_fallback": fallback} if fallback else {})},
        )
    return ExportResult(Path(out), exporter, section, verification, manifest, fallback)

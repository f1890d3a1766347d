"""``bigmodel quantize``: int8 models that are smaller, faster where the CPU allows it, and measured
on the runtime that will run them.

One call, ``quantize_artifact``: validate everything, then

- ``dynamic`` / ``static``: take the artifact's fp32 ``model.onnx`` (exporting a PyTorch artifact
  first with ``export=True``), run ONNX Runtime's pre-processing and quantizer
  (``onnx_int8.py``) with the int8 scheme chosen for this CPU
  (``scheme.py``), calibrating static models on ``calib_samples`` inputs;
- ``weight-only``: int8 or packed int4 weights in ``model.safetensors``
  (``weight_only.py``), dequantized when the artifact is loaded;

then measure before and after on the same split and the same threads (``measure.py``),
apply the accuracy gate (``gate.py``: rank nodes by per-tensor error, keep the worst in
float, retry), and write a stage-"quantize" artifact whose parent is the input artifact. Temporary
files live in a TemporaryDirectory; the artifact is written through ``atomic_directory``, so a
failure (exit 1) or a user error (exit 2) leaves nothing behind.
"""


from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from bigmodel_cli import artifact as art
from bigmodel_cli.config import is_finite_number, threads_problem
from bigmodel_cli.data import SPLITS
from bigmodel_cli.errors import ConfigErrors, UserError
from bigmodel_cli.output_lock import hold
from bigmodel_cli.output_staging import clean_stale_temp
from ...core.progress import no_progress
from .int8_flow import onnx_int8
from .onnx_int8 import METHODS
from .options import QuantizeOptions, QuantizeResult, options_record
from .qat_flow import qat_int8
from .scheme import SCHEMES
from bigmodel_cli.weights import BITS

MODES = ("auto", "dynamic", "static", "weight-only", "matmul-nbits")
TEMP_PREFIX = "bigmodel-quantize-"  # + pid + "-": the work directory in the system's temp folder
# The defaults: convolutions calibrate well and run as QLinearConv; dense layers and
# transformers quantize their weights ahead of time and their activations at run time.
AUTO_MODE = {"cnn": "static"}



def resolve_mode(options: QuantizeOptions, artifact: art.Artifact) -> str:
    if options.qat and options.mode == "auto":
        return "static"  # QAT simulates, and then exports, static QDQ int8
    if options.mode != "auto":
        return options.mode
    return AUTO_MODE.get(artifact.model_spec.get("arch"), "dynamic")


def validate(options: QuantizeOptions, artifact: art.Artifact) -> str:
    """Every problem with the options (and whether this artifact can be quantized) at once, before
    any work. Returns the mode."""
    p: list[str] = []
    if options.mode not in MODES:
        p.append(f"--mode {options.mode!r} is unknown; choose dynamic, static or weight-only (auto: static for cnn, dynamic otherwise)")
    mode = resolve_mode(options, artifact) if options.mode in MODES else None
    onnx_mode = mode in ("dynamic", "static")
    if mode == "matmul-nbits":
        from .onnx_nbits import options_problems

        p += options_problems(options.bits, options.group_size, options.accuracy_level)
    if options.method is not None and options.method not in METHODS:
        p.append(f"--method {options.method!r} is unknown; choose one of {', '.join(METHODS)}")
    elif options.method is not None and mode != "static" and mode is not None:
        p.append(f"--method is the calibration method of --mode static; {mode} quantization does not calibrate")
    if mode == "matmul-nbits":
        pass  # checked above, with MatMulNBits' own limits
    elif options.bits not in BITS:
        p.append(f"--bits {options.bits} is not possible; weight-only stores 8 or 4 bits per weight")
    elif options.bits != 8 and onnx_mode:
        p.append(f"--bits {options.bits} is for --mode weight-only; ONNX Runtime's {mode} quantization is int8")
    if mode != "matmul-nbits" and (options.group_size < 2 or options.group_size % 2):
        p.append(f"--group-size must be an even number of at least 2 (two 4-bit weights share a byte), got {options.group_size}")
    if options.calib_samples < 1:
        p.append(f"--calib-samples must be at least 1, got {options.calib_samples}")
    if options.calib_data is not None and (mode == "weight-only" or (mode == "dynamic" and options.max_metric_drop is None)):
        p.append("--calib-data feeds static calibration and the accuracy gate's error ranking; "
                 f"{mode} quantization without --max-metric-drop does not use it")
    if options.max_metric_drop is not None and not (is_finite_number(options.max_metric_drop) and options.max_metric_drop >= 0):
        p.append(f"--max-metric-drop must be a finite number, 0 or more (accuracy points, or perplexity percent), got {options.max_metric_drop}")
    if options.max_retries < 0:
        p.append(f"--max-retries must be 0 or more, got {options.max_retries}")
    if options.scheme not in SCHEMES:
        p.append(f"--scheme {options.scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if options.split not in SPLITS:
        p.append(f"--split {options.split!r} is unknown; choose one of {', '.join(SPLITS)}")
    if options.iterations < 1 or options.warmup < 0 or (options.bench_batch is not None and options.bench_batch < 1):
        p.append("--iterations and --bench-batch must be at least 1 and --warmup not negative")
    if options.limit is not None and options.limit < 1:
        p.append(f"--limit must be at least 1, got {options.limit}")
    if threads_problem(options.threads):
        p.append(threads_problem(options.threads))
    if mode == "matmul-nbits" and (options.export or options.calib_data is not None):
        p.append("--export and --calib-data are not for --mode matmul-nbits: quantize an export (bigmodel export ART --out DIR)")
    if options.export and mode == "weight-only":
        p.append("--export is for the ONNX modes; weight-only quantizes model.safetensors")
    p += _qat_problems(options, mode)
    if p:
        raise ConfigErrors(p, "quantize options")
    if artifact.stage == "quantize":
        parent = (artifact.manifest.get("parent") or {}).get("path", "its parent")
        raise UserError(f"{artifact.path}: is already quantized; quantize the artifact it came from ({parent})")
    if options.qat and options.train is not None:
        options.train.validate()  # --lr, --batch-size, --patience: the training loop's own checks, before any work
    if options.qat and options.nproc is not None:
        from ...training.launcher import check_options

        check_options(options.nproc, None, (options.train.device if options.train is not None else "auto"))
    if options.qat and (artifact.has_onnx or not artifact.has_weights):
        # An export's weights are a copy of its parent's: the parent is what QAT trains and writes.
        parent = (artifact.manifest.get("parent") or {}).get("path", "its PyTorch parent")
        raise UserError(f"{artifact.path}: is an ONNX artifact; --qat fine-tunes a PyTorch artifact's weights: give the "
                        f"artifact it came from ({parent})")
    if options.qat:
        return mode
    if mode == "weight-only" and not artifact.has_weights:
        parent = (artifact.manifest.get("parent") or {}).get("path", "its PyTorch parent")
        raise UserError(f"{artifact.path}: has no model.safetensors (an ONNX-only artifact); weight-only quantizes "
                        f"PyTorch weights: give the artifact it came from ({parent})")
    if mode == "matmul-nbits" and not artifact.has_onnx:
        raise UserError(f"{artifact.path}: was never exported to ONNX; --mode matmul-nbits quantizes an export: "
                        f"run `bigmodel export {artifact.path} --out DIR` and quantize DIR")
    if onnx_mode and not artifact.has_onnx:
        if not options.export:
            raise UserError(f"{artifact.path}: was never exported to ONNX; run `bigmodel export {artifact.path} --out DIR` "
                            "and quantize DIR, or pass --export to export it here")
    elif onnx_mode and (artifact.config.get("onnx") or {}).get("dtype", "fp32") != "fp32":
        raise UserError(f"{artifact.path}: is a {artifact.config['onnx']['dtype']} export; quantize an fp32 export "
                        f"(bigmodel export {(artifact.manifest.get('parent') or {}).get('path', 'PARENT')} --out DIR)")
    return mode


def _qat_problems(options: QuantizeOptions, mode: str | None) -> list[str]:
    if not options.qat:
        if options.finetune_epochs or options.finetune_steps is not None:
            return ["--finetune-epochs/--finetune-steps are the fine-tuning budget of --qat; add --qat"]
        if options.finetune_lr is not None:
            return ["--lr is the fine-tuning learning rate of --qat; post-training quantization does not train: "
                    "drop --lr, or add --qat"]
        if options.nproc is not None:
            return ["--nproc runs --qat's fine-tuning in several processes; post-training quantization runs in one: "
                    "drop --nproc, or add --qat"]
        return []
    p = []
    if mode is not None and mode != "static":
        p.append(f"--qat trains for static QDQ int8; --mode {mode} cannot carry trained activation scales "
                 "(drop --mode, or give --mode static)")
    if options.finetune_epochs < 0 or (options.finetune_steps is not None and options.finetune_steps < 0):
        p.append("--finetune-epochs and --finetune-steps must not be negative")
    elif options.finetune_epochs == 0 and not options.finetune_steps:
        p.append("--qat needs a fine-tuning budget: give --finetune-epochs N or --finetune-steps N (at least 1)")
    if options.finetune_lr is not None and not (is_finite_number(options.finetune_lr) and options.finetune_lr > 0):
        p.append(f"--lr must be a finite positive number, got {options.finetune_lr} "
                 "(or leave it out: 10% of the rate that trained the model)")
    resume = bool(options.train is not None and options.train.resume)
    if resume and not options.finetune_dir:
        p.append("--resume continues a kept fine-tuning run: give the --finetune-dir of the run to continue")
    elif options.finetune_dir and not resume and Path(options.finetune_dir).exists():
        p.append(f"--finetune-dir {options.finetune_dir} already exists; add --resume to continue that run, "
                 "or choose a new directory")
    return p



def quantize_artifact(source: art.Artifact, out: Path | str, options: QuantizeOptions | None = None, *,
                      overwrite: bool = False, progress: Callable[..., Any] | None = None) -> QuantizeResult:
    """Quantize ``source`` into a new stage-"quantize" artifact at ``out`` (see the module docstring).

    Raises UserError (exit 2) for anything the user can fix, before any work where it can be
    known then, and WorkFailed (exit 1) when quantization or the accuracy gate fails; either way
    nothing is written. ``progress(event, **info)`` receives "stage" (name), "calibrate" and
    "bench" (done, total) events."""
    options = options or QuantizeOptions()
    say = progress or no_progress
    mode = validate(options, source)
    with hold(out):  # one writer per output, from the checks to the rename
        inputs = [source.path, source.data_spec.get("path"), _calibration_path(options.calib_data), options.finetune_dir]
        art.check_output(out, overwrite, inputs)
        if mode != "weight-only" and source.has_onnx:
            from ...onnx.files import check_external_data

            check_external_data(source.path / art.ONNX_FILE)  # a short model.onnx.data is the user's to fix
        # The work files of a quantize that was killed are removed by the next one (the pid in the
        # name tells a dead owner from a live one).
        clean_stale_temp(TEMP_PREFIX)
        with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
            if mode == "matmul-nbits":
                from .onnx_nbits import quantize_nbits

                report, section, gate, manifest = quantize_nbits(source, Path(out), options, overwrite, Path(tmp),
                                                                 say, options_record(options, mode))
                return QuantizeResult(Path(out), mode, report, section, gate, manifest)
            if mode == "weight-only":
                from .weight_only import quantize_weights

                report, section, gate, manifest = quantize_weights(source, Path(out), options, overwrite, Path(tmp),
                                                                   say, options_record(options, mode))
                return QuantizeResult(Path(out), mode, report, section, gate, manifest)
            if options.qat:
                return qat_int8(source, Path(out), options, overwrite, Path(tmp), say)
            return onnx_int8(source, Path(out), options, mode, overwrite, Path(tmp), say)



def _calibration_path(calib_data: str | None) -> str | None:
    """The file behind --calib-data (DATA forms or a .npy file), which --out may not hold."""
    if not calib_data:
        return None
    name, sep, arg = calib_data.partition(":")
    if sep and name in ("csv", "npz", "text"):
        return arg or None
    return calib_data if not sep else None



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

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bigmodel_cli import artifact as art
from bigmodel_cli.config import is_finite_number, threads_problem
from bigmodel_cli.data import SPLITS
from bigmodel_cli.errors import ConfigErrors, UserError, WorkFailed
from bigmodel_cli.output_lock import hold
from bigmodel_cli.output_staging import clean_stale_temp
from ...core.progress import no_progress
from ...evaluate import BenchConfig
from . import gate as gating
from .measure import Evaluator, build_report, latency, manifest_metrics, model_bytes, onnx_predict
from .decoder_int8 import DecoderResult, quantize_decoder
from .onnx_int8 import METHODS
from .scheme import SCHEMES
from bigmodel_cli.weights import BITS

MODES = ("auto", "dynamic", "static", "weight-only", "matmul-nbits")
TEMP_PREFIX = "bigmodel-quantize-"  # + pid + "-": the work directory in the system's temp folder
# The defaults: convolutions calibrate well and run as QLinearConv; dense layers and
# transformers quantize their weights ahead of time and their activations at run time.
AUTO_MODE = {"cnn": "static"}


@dataclass
class QuantizeOptions:
    mode: str = "auto"  # auto: static for cnn, dynamic for mlp, gpt and user models
    method: str | None = None  # static calibration: minmax (default), entropy, percentile
    calib_samples: int = 256
    calib_data: str | None = None  # the --data forms, or a .npy array of raw inputs
    target: str | None = None  # --calib-data csv:PATH
    per_channel: bool = False
    scheme: str = "auto"  # auto (per CPU), u8s8, s8s8, u8u8
    reduce_range: bool | None = None  # None: as the scheme says
    exclude: list[str] = field(default_factory=list)  # nodes (ONNX) or tensors (weight-only) kept in float
    exclude_sensitive: bool | None = None  # static transformers: LayerNorm, Softmax, GELU, residual Add (default on)
    bits: int = 8  # weight-only: 8 or 4
    group_size: int = 64  # weight-only --bits 4; matmul-nbits: the block size (a power of two, 16+)
    symmetric: bool = True  # matmul-nbits: no zero point (asymmetric adds one per block)
    accuracy_level: int | None = None  # matmul-nbits: the kernel's compute type (4 = int8, fast with VNNI)
    max_metric_drop: float | None = None  # accuracy points, or perplexity increase in percent
    max_retries: int = 3
    export: bool = False  # export a PyTorch artifact to ONNX first
    preprocess: bool = True
    split: str = "val"
    limit: int | None = None
    bench: bool = True
    bench_batch: int | None = None
    seq_len: int | None = None
    iterations: int = 30
    warmup: int = 3
    threads: int | None = None
    qat: bool = False  # quantization-aware training (qat.py), then static QDQ of the trained weights
    finetune_epochs: int = 0  # --qat: the fine-tuning budget, in epochs …
    finetune_steps: int | None = None  # … or in steps
    train: Any = None  # --qat: the TrainConfig of the fine-tuning (batch size, resume, …); None: defaults
    # --qat: the fine-tuning learning rate, which replaces ``train``'s; None: QAT_LR_FRACTION of the
    # rate that trained the source (qat.default_learning_rate)
    finetune_lr: float | None = None
    finetune_dir: str | None = None  # --qat: keep the fine-tuning run here (checkpoints: --resume continues it)
    nproc: int | None = None  # --qat: fine-tune in N data-parallel processes (as train --nproc)


@dataclass
class QuantizeResult:
    path: Path
    mode: str
    report: dict
    quantization: dict
    gate: dict
    manifest: dict


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
                                                                 say, _options_record(options, mode))
                return QuantizeResult(Path(out), mode, report, section, gate, manifest)
            if mode == "weight-only":
                from .weight_only import quantize_weights

                report, section, gate, manifest = quantize_weights(source, Path(out), options, overwrite, Path(tmp),
                                                                   say, _options_record(options, mode))
                return QuantizeResult(Path(out), mode, report, section, gate, manifest)
            if options.qat:
                return _qat_int8(source, Path(out), options, overwrite, Path(tmp), say)
            return _onnx_int8(source, Path(out), options, mode, overwrite, Path(tmp), say)


def _calibration_path(calib_data: str | None) -> str | None:
    """The file behind --calib-data (DATA forms or a .npy file), which --out may not hold."""
    if not calib_data:
        return None
    name, sep, arg = calib_data.partition(":")
    if sep and name in ("csv", "npz", "text"):
        return arg or None
    return calib_data if not sep else None


def _options_record(options: QuantizeOptions, mode: str) -> dict:
    record = dataclasses.asdict(options)
    record["mode"] = mode
    return record


# --- ONNX Runtime int8 ---------------------------------------------------------------------------


def _working_float_model(fp32: Path, tmp: Path, options: QuantizeOptions, mode: str) -> tuple[Path, dict]:
    """The float model the quantizer, the ranking and the exclusions all see (pre-processed).

    Named float.onnx (float.onnx.data for a model over 2 GB), never model.onnx: onnx.save_model
    refuses an external-data location that exists in the *current directory*, which model.onnx.data
    would whenever quantize is run from inside an export directory."""
    from ...onnx import files as onnx_files
    from .onnx_int8 import load_graph, preprocess

    work = tmp / "float.onnx"
    info: dict = {"applied": False, "reason": "--no-preprocess"}
    if options.preprocess:
        info = preprocess(fp32, work)
    if not work.exists():
        onnx_files.copy(fp32, work)  # its tensors now point into float.onnx.data
    if mode == "dynamic" and any(n.op_type == "Gemm" for n in load_graph(work).node):
        # The dynamic quantizer turns Gemm into MatMul + Add before it reads its exclusion list;
        # doing it here first (with ORT's own helper) gives every node its final name.
        import onnx
        from onnxruntime.quantization.onnx_model import ONNXModel

        external = onnx_files.has_external_data(work)
        model = ONNXModel(onnx.load(str(work)))  # tensors loaded: the files can be rewritten below
        model.replace_gemm_with_matmul()
        onnx_files.save_proto(model.model, work, external)
    return work, info


def _user_exclusions(names: list[str], graph) -> list[str]:
    nodes = {n.name for n in graph.node}
    resolved, unknown = [], []
    for name in names:
        if name in nodes:
            resolved.append(name)
        elif name + "_MatMul" in nodes:  # a Gemm the dynamic quantizer sees as MatMul + Add
            resolved.append(name + "_MatMul")
        else:
            unknown.append(name)
    if unknown:
        known = ", ".join(n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "Gather"))[:300]
        raise UserError(f"--exclude {', '.join(unknown)}: no node of that name in the model; its compute nodes are {known}")
    return resolved


@dataclass
class _Int8Plan:
    """What every quantization attempt shares, fixed before the first: the float model the
    quantizer, the ranking and the exclusions all see, and the choices made for it."""

    fp32: Path  # the fp32 model.onnx that is measured as "before" (the artifact's, or exported here)
    work: Path  # its pre-processed copy, which is what gets quantized
    preprocess_info: dict
    graph: Any  # work's graph (node names, for exclusions and the report)
    input_name: str
    settings: Any  # onnx_int8.Int8Settings
    scheme: Any  # scheme.Scheme
    transformer: bool
    sensitive: list[dict]  # static transformers: nodes kept in float by kind (LayerNorm, Softmax, …)
    user: list[str]  # --exclude, resolved to node names

    @property
    def excluded(self) -> list[str]:
        """The nodes every attempt keeps in float (the gate may add more)."""
        return list(dict.fromkeys([s["node"] for s in self.sensitive] + self.user))


def _plan_int8(fp32: Path, tmp: Path, options: QuantizeOptions, mode: str, say: Callable) -> _Int8Plan:
    """Pre-process the float model, choose the int8 scheme for this CPU and the nodes kept in float."""
    from ...core import hardware
    from .calibration import onnx_input
    from .onnx_int8 import Int8Settings, is_transformer, load_graph, sensitive_nodes
    from .scheme import choose_scheme, detect_isa

    input_spec = onnx_input(fp32)
    say("stage", name="preprocess")
    work, preprocess_info = _working_float_model(fp32, tmp, options, mode)
    graph = load_graph(work)
    scheme = choose_scheme(detect_isa(hardware.cpu_flags()), options.scheme, options.reduce_range)
    transformer = is_transformer(graph)
    keep_sensitive = options.exclude_sensitive if options.exclude_sensitive is not None else transformer
    return _Int8Plan(
        fp32=fp32, work=work, preprocess_info=preprocess_info, graph=graph, input_name=input_spec.name,
        settings=Int8Settings(mode, scheme, options.per_channel, options.method or "minmax"), scheme=scheme,
        transformer=transformer, sensitive=sensitive_nodes(graph) if (mode == "static" and keep_sensitive) else [],
        user=_user_exclusions(options.exclude, graph))


class _Int8Attempts:
    """Quantization attempts and their measurements. Every attempt is written to the same file
    (``path``), so after the gate that file and ``latest`` are the attempt that ships: the first,
    or the last retry."""

    def __init__(self, source: art.Artifact, plan: _Int8Plan, calib, options: QuantizeOptions, tmp: Path,
                 say: Callable):
        self.source, self.plan, self.calib, self.options, self.tmp, self.say = source, plan, calib, options, tmp, say
        self.mode = plan.settings.mode
        self.path = tmp / "int8" / "int8.onnx"
        self.cache = tmp / "calibration.json"  # calibrate once; retries reuse the ranges
        self.candidates: list = []  # the nodes the first attempt quantized (what the gate may keep in float)
        self.evaluator: Evaluator | None = None
        self.before: dict = {}  # the fp32 model's metrics
        self.latest: dict = {}  # the latest attempt's metrics

    def quantize(self, excluded: list[str]) -> Path:
        """Quantize the plan's float model, keeping its exclusions and ``excluded`` in float."""
        from .calibration import make_reader
        from .onnx_int8 import quantize_file

        self.say("stage", name="quantize")
        # In its own directory, so a retry starts clean. Not named model.onnx: ORT saves external
        # data through onnx.save_model, which refuses a location that exists in the current directory.
        shutil.rmtree(self.path.parent, ignore_errors=True)
        self.path.parent.mkdir()
        static = self.mode == "static"
        reader = make_reader(self.plan.input_name, self.calib.batches, self.say) if static else None
        quantize_file(self.plan.work, self.path, self.plan.settings, self.plan.excluded + excluded, reader,
                      cache=self.cache if static else None)
        return self.path

    def quantize_first(self) -> None:
        from .onnx_int8 import quantized_nodes

        self.quantize([])
        self.candidates = quantized_nodes(self.plan.graph, self.path, self.mode)
        if not self.candidates:
            raise WorkFailed("ONNX Runtime quantized nothing in this model (no MatMul, Gemm, Conv or Gather left to "
                             "quantize — check --exclude); nothing was written")

    def measure_first(self) -> None:
        """The task metric of the fp32 model and of the first attempt, on the same split."""
        self.say("stage", name="evaluate")
        self.evaluator = Evaluator(self.source, self.options.split, self.options.limit)
        self.before = self.evaluator(onnx_predict(self.plan.fp32, self.options.threads))
        self.latest = self.evaluator(onnx_predict(self.path, self.options.threads))

    def rank(self) -> list[dict]:
        """The first attempt's quantized nodes, worst per-tensor error first (the gate's order of
        keeping them in float)."""
        from .gate import rank_nodes, tensor_errors

        per_task = gating.RANK_SAMPLES[self.source.task]
        batches, total = [], 0
        for batch in self.calib.batches:  # a few batches: every intermediate tensor is kept in memory
            if total >= per_task:
                break
            batches.append(batch)
            total += len(batch)
        rank_dir = self.tmp / "rank"
        rank_dir.mkdir(exist_ok=True)
        errors = tensor_errors(self.plan.work, self.path, self.mode, self.plan.input_name, batches, rank_dir)
        return rank_nodes(self.plan.graph, self.candidates, errors)

    def retry(self, excluded: list[str]) -> dict:
        """Quantize again with ``excluded`` in float; its metrics."""
        path = self.quantize(excluded)
        self.say("stage", name="evaluate")
        self.latest = self.evaluator(onnx_predict(path, self.options.threads))
        return self.latest

    def gate(self) -> gating.GateResult:
        """Apply --max-metric-drop: retries keep the worst nodes in float; a gate still failing
        after them is a WorkFailed (exit 1, nothing written)."""
        gate = gating.run_gate(task=self.source.task, limit=self.options.max_metric_drop, before=self.before,
                               first=self.latest, rank=self.rank, retry=self.retry,
                               max_retries=self.options.max_retries, progress=self.say)
        if not gate.passed:
            raise gating.failure(gate)
        return gate


def _onnx_int8(source: art.Artifact, out: Path, options: QuantizeOptions, mode: str, overwrite: bool, tmp: Path,
               say: Callable) -> QuantizeResult:
    """ONNX Runtime's dynamic or static int8, in named steps: calibration inputs, the fp32 model
    (exported here if need be), the plan (pre-processing, scheme, exclusions), the first attempt and
    its measurement, the accuracy gate (retries), the file that ships, its report, the artifact."""
    calib = _calibration_inputs(source, options, mode)
    onnx_artifact, exported = _fp32_artifact(source, options, tmp, say)
    plan = _plan_int8(onnx_artifact.path / art.ONNX_FILE, tmp, options, mode, say)
    attempts = _Int8Attempts(source, plan, calib, options, tmp, say)
    attempts.quantize_first()
    attempts.measure_first()
    gate = attempts.gate()
    final = _shipped_file(attempts.path, tmp)
    decoder = quantize_decoder(onnx_artifact, mode, plan.settings, plan.excluded + gate.excluded, attempts.before,
                               options.max_metric_drop, attempts.evaluator, tmp, options.threads, options.bench, say)
    report = _int8_report(source, options, attempts, final, say)
    if decoder.report:
        report["decoder"] = decoder.report
    section = _quantization_section(plan, options, calib, gate, final, exported)
    say("stage", name="write")
    manifest = _write_int8(source, onnx_artifact, out, overwrite, final, options, mode, report, section, gate,
                           decoder=decoder)
    return QuantizeResult(out, mode, report, section, gate.as_dict(), manifest)


def _qat_int8(source: art.Artifact, out: Path, options: QuantizeOptions, overwrite: bool, tmp: Path,
              say: Callable) -> QuantizeResult:
    """Quantization-aware training, in named steps: post-training static int8 of the source (the
    row QAT must beat, and the scheme the simulation copies), fine-tuning with int8 simulated
    (qat.py), static QDQ of the trained weights with its own calibration, the accuracy gate against
    the fp32 model, the four-row report, and an artifact holding the int8 model.onnx and the fp32
    shadow weights (model.safetensors). Both int8 models are per channel, as simulated."""
    from .qat import quantizable_layers

    quantizable_layers(source.build_model())  # a layer the simulation cannot place: refused before any work
    options = dataclasses.replace(options, per_channel=True)
    calib = _calibration_inputs(source, options, "static")
    ptq = _static_attempt(source, options, calib, tmp / "ptq", say)
    # Where the full flow would quantize more than the weight layers (attention, embeddings: any
    # transformer), the export quantizes only what is simulated (qat.py's docstring says why).
    from .onnx_int8 import quantizes_beyond_weight_layers

    layers_only = quantizes_beyond_weight_layers(ptq.plan.graph)
    say("stage", name="finetune")
    trained = _qat_finetune(source, options, calib, ptq.plan.scheme, tmp, say, quantize_output=not layers_only)
    shadow = art.open_artifact(trained["best_dir"])
    qat = _static_attempt(shadow, options, calib, tmp / "qat", say, before=ptq.before, weight_layers_only=layers_only)
    gate = qat.gate()
    final = _shipped_file(qat.path, tmp / "qat")
    ptq_final = _shipped_file(ptq.path, tmp / "ptq")
    say("stage", name="evaluate")
    agreement = _qat_agreement(trained["model"], final, qat.evaluator, options.threads)
    report = _qat_report(source, options, ptq, qat, ptq_final, final, say)
    report["qat"] = {**{k: v for k, v in trained.items() if k not in ("best_dir", "model", "quantized_layers", "activations")},
                     "simulated_vs_onnx": agreement, **_qat_selection(trained)}
    section = {**_quantization_section(qat.plan, options, calib, gate, final, None),
               "qat": {"activation_scales": "minmax-calibrated, frozen during fine-tuning, re-calibrated on the trained weights",
                       "weights": "per-channel symmetric int8, straight-through gradients",
                       "placement": ("the weight layers' inputs and weights only (outputs in float), as simulated"
                                     if layers_only else "ONNX Runtime's static QDQ flow"),
                       "layers": trained["layers"], "activations": trained["activations"],
                       "fp32_shadow_weights": art.WEIGHTS_FILE}}
    say("stage", name="write")
    files = {art.WEIGHTS_FILE: shadow.path / art.WEIGHTS_FILE}
    if (shadow.path / art.MODEL_CODE_FILE).exists():
        files[art.MODEL_CODE_FILE] = shadow.path / art.MODEL_CODE_FILE
    onnx_artifact = art.open_artifact(qat.plan.fp32.parent)
    manifest = _write_int8(source, onnx_artifact, out, overwrite, final, options, "static", report, section, gate,
                           files)
    return QuantizeResult(out, "static", report, section, gate.as_dict(), manifest)


KEPT_START = "fine-tuning did not improve on the calibrated model; kept step 0"


def _qat_selection(trained: dict) -> dict:
    """Which step's weights ship, in words: the training loop evaluates the calibrated simulation
    before the first step too, and keeps it unless a step beats it on the validation split."""
    kept_start = trained["best_step"] == 0
    said = KEPT_START if kept_start else f"kept step {trained['best_step']} of {trained['steps']} (best on the val split)"
    return {"kept_start": kept_start, "selection": said}


def _static_attempt(source: art.Artifact, options: QuantizeOptions, calib, tmp: Path, say: Callable,
                    before: dict | None = None, weight_layers_only: bool = False) -> _Int8Attempts:
    """Static QDQ int8 of ``source`` in its own work directory, quantized and measured; ``before``
    replaces its fp32 metrics (QAT measures against the original fp32 model); ``weight_layers_only``:
    quantize the weight layers only (onnx_int8.weight_layer_nodes)."""
    tmp.mkdir()
    onnx_artifact, _ = _fp32_artifact(source, options, tmp, say)
    plan = _plan_int8(onnx_artifact.path / art.ONNX_FILE, tmp, options, "static", say)
    if weight_layers_only:
        plan.settings = dataclasses.replace(plan.settings, weight_layers_only=True)
        plan.sensitive = []  # nothing but the weight layers is quantized: nothing else to keep in float
    attempts = _Int8Attempts(source, plan, calib, options, tmp, say)
    attempts.quantize_first()
    attempts.measure_first()
    if before is not None:
        attempts.before = before
    return attempts


def _qat_finetune(source: art.Artifact, options: QuantizeOptions, calib, scheme, tmp: Path, say: Callable,
                  quantize_output: bool = True) -> dict:
    from bigmodel_cli.config import TrainConfig
    from .qat import default_learning_rate, finetune

    train = options.train or TrainConfig()
    run_dir = tmp / "finetune"
    if options.finetune_dir:
        run_dir = Path(options.finetune_dir)  # kept, so that --resume can continue it
    lr = options.finetune_lr if options.finetune_lr is not None else default_learning_rate(source)
    cfg = dataclasses.replace(train, model=str(source.path), out=str(run_dir), lr=lr,
                              epochs=options.finetune_epochs or None, max_steps=options.finetune_steps or None,
                              overwrite=False, resume=bool(options.finetune_dir and train.resume))
    return {**finetune(source, calib.batches, scheme, cfg, run_dir, say, quantize_output, options.nproc, tmp), "lr": lr}


def _qat_agreement(model, int8: Path, evaluator: Evaluator, threads: int | None) -> dict:
    """Top-1 agreement and metrics of the fake-quantized PyTorch model and the ONNX Runtime int8
    model on the same split: the simulation is only worth training against if it is what runs."""
    import numpy as np
    import torch

    outputs: dict[str, list] = {"simulated": [], "onnx": []}

    def recording(name, predict):
        def run(x):
            y = np.asarray(predict(x))
            outputs[name].append(y)
            return y
        return run

    def simulated(x):
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(x))).float().numpy()

    model.cpu().eval()
    metrics = {"simulated": evaluator(recording("simulated", simulated)),
               "onnx": evaluator(recording("onnx", onnx_predict(int8, threads)))}
    a = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs["simulated"]]).argmax(-1)
    b = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs["onnx"]]).argmax(-1)
    return {"top1_agreement": float((a == b).mean()) if len(a) else 1.0, "predictions": int(len(a)), **metrics}


def _qat_report(source: art.Artifact, options: QuantizeOptions, ptq: _Int8Attempts, qat: _Int8Attempts,
                ptq_final: Path, final: Path, say: Callable) -> dict:
    """fp32 (before), post-training static int8 (ptq) and QAT int8 (after), side by side."""
    fp32 = ptq.plan.fp32
    timing = None
    if options.bench:
        say("stage", name="bench")
        cfg = BenchConfig(batch_size=options.bench_batch, warmup=options.warmup, iterations=options.iterations,
                          seq_len=options.seq_len)
        timing = latency({"before": fp32, "ptq": ptq_final, "after": final}, source, ptq.evaluator, cfg,
                         options.threads, say)
    report = build_report(source.task, {**ptq.before, "file_bytes": model_bytes(fp32)},
                          {**qat.latest, "file_bytes": model_bytes(final)}, timing)
    report["ptq"] = {**ptq.latest, "file_bytes": model_bytes(ptq_final), **((timing or {}).get("ptq") or {})}
    return report


def _calibration_inputs(source: art.Artifact, options: QuantizeOptions, mode: str):
    """Calibration batches for static quantization and the gate's ranking, else None. Read first:
    data that does not fit the model is the user's to fix, before any work. (An export made here
    has symbolic batch and sequence axes, like no fixed input at all.)"""
    from .calibration import calibration_set, onnx_input

    if not (mode == "static" or options.max_metric_drop is not None):
        return None
    fixed = onnx_input(source.path / art.ONNX_FILE) if source.has_onnx else None
    return calibration_set(source, fixed, samples=options.calib_samples, calib_data=options.calib_data,
                           target=options.target, seq_len=options.seq_len)


def _fp32_artifact(source: art.Artifact, options: QuantizeOptions, tmp: Path,
                   say: Callable) -> tuple[art.Artifact, dict | None]:
    """The artifact whose model.onnx is quantized: the source, or (--export) its export into tmp,
    with how it was exported."""
    if source.has_onnx:
        return source, None
    from ...onnx.export import ExportOptions, export_artifact

    say("stage", name="export")
    result = export_artifact(source, tmp / "export", ExportOptions(weights=False), threads=options.threads)
    exported = {"exporter": result.exporter, "opset": result.onnx["opset"],
                "verify_max_abs_diff": result.verification["max_abs_diff"]}
    return art.open_artifact(result.path), exported


def _shipped_file(int8: Path, tmp: Path) -> Path:
    """The int8 file laid out by its own size: one file when it fits (usually: int8 weights are a
    quarter of the float ones), model.onnx.data beside it above the export threshold. The checker
    and the timing then run on the file that ships."""
    from ...onnx import files as onnx_files
    from ...onnx.export import check_onnx_file
    from ...onnx.exporters import needs_external_data

    final = tmp / "final" / art.ONNX_FILE
    final.parent.mkdir()
    onnx_files.place(int8, final, needs_external_data(onnx_files.total_bytes(int8)))
    check_onnx_file(final)  # the ONNX checker's full check, as for every export
    return final


def _int8_report(source: art.Artifact, options: QuantizeOptions, attempts: _Int8Attempts, final: Path,
                 say: Callable) -> dict:
    """Before and after side by side: metrics, file sizes and (unless --no-bench) latency."""
    fp32 = attempts.plan.fp32
    timing = None
    if options.bench:
        say("stage", name="bench")
        cfg = BenchConfig(batch_size=options.bench_batch, warmup=options.warmup, iterations=options.iterations,
                          seq_len=options.seq_len)
        timing = latency({"before": fp32, "after": final}, source, attempts.evaluator, cfg, options.threads, say)
    return build_report(source.task, {**attempts.before, "file_bytes": model_bytes(fp32)},
                        {**attempts.latest, "file_bytes": model_bytes(final)}, timing)


def _quantization_section(plan: _Int8Plan, options: QuantizeOptions, calib, gate: gating.GateResult, final: Path,
                          exported: dict | None) -> dict:
    """config.json's "quantization": how the model was quantized and which nodes stayed in float, and why."""
    from .onnx_int8 import quantized_nodes

    mode = plan.settings.mode
    scheme_record = plan.scheme.as_dict()
    if mode == "dynamic" and plan.scheme.activation_type != "uint8":
        scheme_record.update(activation_type="uint8", name="u8" + plan.scheme.name[2:],
                             note="dynamic quantization computes activations at run time with DynamicQuantizeLinear, which is uint8 only")
    return {
        "mode": mode,
        "format": "QDQ" if mode == "static" else "integer ops (DynamicQuantizeLinear, MatMulInteger)",
        "scheme": scheme_record,
        "per_channel": options.per_channel,
        "calibration": ({"method": plan.settings.method, **calib.describe()} if mode == "static" else None),
        "excluded_nodes": list(dict.fromkeys(plan.excluded + gate.excluded)),
        "excluded_by": {"sensitive": plan.sensitive, "user": plan.user, "gate": gate.excluded},
        "quantized_nodes": quantized_nodes(plan.graph, final, mode),
        "transformer": plan.transformer,
        "preprocess": plan.preprocess_info,
        **({"exported_for_quantize": exported} if exported else {}),
    }


def _write_int8(source: art.Artifact, onnx_artifact: art.Artifact, out: Path, overwrite: bool, final: Path,
                options: QuantizeOptions, mode: str, report: dict, section: dict, gate: gating.GateResult,
                files: dict[str, Path] | None = None, decoder: DecoderResult | None = None) -> dict:
    """The stage-"quantize" artifact, whose parent is ``source``, written whole or not at all; its
    manifest. ``files``: more files it holds (QAT's fp32 shadow weights); ``decoder``: the int8
    decoder.onnx, when one was kept."""
    from ...onnx import files as onnx_files
    from ...onnx.export import onnx_section

    with art.atomic_directory(out, overwrite) as staging:
        onnx_files.place(final, staging / art.ONNX_FILE, onnx_files.has_external_data(final))
        previous = onnx_artifact.config.get("onnx") or {}
        onnx_meta = onnx_section(staging / art.ONNX_FILE, exporter=previous.get("exporter", "unknown"),
                                 opset=_opset(staging / art.ONNX_FILE), dtype="int8",
                                 optimize=previous.get("optimize", "basic"), dynamic=tuple(previous.get("dynamic", ())))
        if decoder is not None and decoder.path is not None:
            onnx_files.place(decoder.path, staging / decoder.path.name, onnx_files.has_external_data(decoder.path))
            onnx_meta["decoder"] = decoder.section
        onnx_artifact.copy_tokenizer(staging)
        for name, path in (files or {}).items():
            shutil.copyfile(path, staging / name)
        config = {**onnx_artifact.config, "onnx": onnx_meta, "quantization": section}
        return art.write_metadata(
            staging, config=config, stage="quantize", parent=source, options=_options_record(options, mode),
            metrics=manifest_metrics(report), extra={"report": report, "quantization": section, "gate": gate.as_dict()})


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 0)

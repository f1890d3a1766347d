"""The ONNX Runtime int8 flow of ``bigmodel quantize`` (dynamic and static), in named steps: the
calibration inputs, the fp32 model (exported here if need be), the plan (pre-processing, the
CPU's scheme, the nodes kept in float), the first attempt and its measurement, the accuracy gate
(retries), the file that ships, its report and the artifact. ``qat_flow.py`` reuses its steps.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bigmodel_cli import artifact as art
from bigmodel_cli.errors import UserError, WorkFailed
from ...evaluate import BenchConfig
from . import gate as gating
from .decoder_int8 import DecoderResult, quantize_decoder
from .measure import Evaluator, build_report, latency, manifest_metrics, model_bytes, onnx_predict
from .options import QuantizeOptions, QuantizeResult, options_record


def working_float_model(fp32: Path, tmp: Path, options: QuantizeOptions, mode: str) -> tuple[Path, dict]:
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


def user_exclusions(names: list[str], graph) -> list[str]:
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
class Int8Plan:
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


def plan_int8(fp32: Path, tmp: Path, options: QuantizeOptions, mode: str, say: Callable) -> Int8Plan:
    """Pre-process the float model, choose the int8 scheme for this CPU and the nodes kept in float."""
    from ...core import hardware
    from .calibration import onnx_input
    from .onnx_int8 import Int8Settings, is_transformer, load_graph, sensitive_nodes
    from .scheme import choose_scheme, detect_isa

    input_spec = onnx_input(fp32)
    say("stage", name="preprocess")
    work, preprocess_info = working_float_model(fp32, tmp, options, mode)
    graph = load_graph(work)
    scheme = choose_scheme(detect_isa(hardware.cpu_flags()), options.scheme, options.reduce_range)
    transformer = is_transformer(graph)
    keep_sensitive = options.exclude_sensitive if options.exclude_sensitive is not None else transformer
    return Int8Plan(
        fp32=fp32, work=work, preprocess_info=preprocess_info, graph=graph, input_name=input_spec.name,
        settings=Int8Settings(mode, scheme, options.per_channel, options.method or "minmax"), scheme=scheme,
        transformer=transformer, sensitive=sensitive_nodes(graph) if (mode == "static" and keep_sensitive) else [],
        user=user_exclusions(options.exclude, graph))


class Int8Attempts:
    """Quantization attempts and their measurements. Every attempt is written to the same file
    (``path``), so after the gate that file and ``latest`` are the attempt that ships: the first,
    or the last retry."""

    def __init__(self, source: art.Artifact, plan: Int8Plan, calib, options: QuantizeOptions, tmp: Path,
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


def onnx_int8(source: art.Artifact, out: Path, options: QuantizeOptions, mode: str, overwrite: bool, tmp: Path,
               say: Callable) -> QuantizeResult:
    """ONNX Runtime's dynamic or static int8, in named steps: calibration inputs, the fp32 model
    (exported here if need be), the plan (pre-processing, scheme, exclusions), the first attempt and
    its measurement, the accuracy gate (retries), the file that ships, its report, the artifact."""
    calib = calibration_inputs(source, options, mode)
    onnx_artifact, exported = fp32_artifact(source, options, tmp, say)
    plan = plan_int8(onnx_artifact.path / art.ONNX_FILE, tmp, options, mode, say)
    attempts = Int8Attempts(source, plan, calib, options, tmp, say)
    attempts.quantize_first()
    attempts.measure_first()
    gate = attempts.gate()
    final = shipped_file(attempts.path, tmp)
    decoder = quantize_decoder(onnx_artifact, mode, plan.settings, plan.excluded + gate.excluded, attempts.before,
                               options.max_metric_drop, attempts.evaluator, tmp, options.threads, options.bench, say)
    report = int8_report(source, options, attempts, final, say)
    if decoder.report:
        report["decoder"] = decoder.report
    section = quantization_section(plan, options, calib, gate, final, exported)
    say("stage", name="write")
    manifest = write_int8(source, onnx_artifact, out, overwrite, final, options, mode, report, section, gate,
                           decoder=decoder)
    return QuantizeResult(out, mode, report, section, gate.as_dict(), manifest)


def calibration_inputs(source: art.Artifact, options: QuantizeOptions, mode: str):
    """Calibration batches for static quantization and the gate's ranking, else None. Read first:
    data that does not fit the model is the user's to fix, before any work. (An export made here
    has symbolic batch and sequence axes, like no fixed input at all.)"""
    from .calibration import calibration_set, onnx_input

    if not (mode == "static" or options.max_metric_drop is not None):
        return None
    fixed = onnx_input(source.path / art.ONNX_FILE) if source.has_onnx else None
    return calibration_set(source, fixed, samples=options.calib_samples, calib_data=options.calib_data,
                           target=options.target, seq_len=options.seq_len)


def fp32_artifact(source: art.Artifact, options: QuantizeOptions, tmp: Path,
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


def shipped_file(int8: Path, tmp: Path) -> Path:
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


def timed(options: QuantizeOptions, paths: dict[str, Path], source: art.Artifact, evaluator: Evaluator,
          say: Callable) -> dict | None:
    """The ONNX files in ``paths`` timed side by side with the --bench options (None with --no-bench)."""
    if not options.bench:
        return None
    say("stage", name="bench")
    cfg = BenchConfig(batch_size=options.bench_batch, warmup=options.warmup, iterations=options.iterations,
                      seq_len=options.seq_len)
    return latency(paths, source, evaluator, cfg, options.threads, say)


def int8_report(source: art.Artifact, options: QuantizeOptions, attempts: Int8Attempts, final: Path,
                 say: Callable) -> dict:
    """Before and after side by side: metrics, file sizes and (unless --no-bench) latency."""
    fp32 = attempts.plan.fp32
    timing = timed(options, {"before": fp32, "after": final}, source, attempts.evaluator, say)
    return build_report(source.task, {**attempts.before, "file_bytes": model_bytes(fp32)},
                        {**attempts.latest, "file_bytes": model_bytes(final)}, timing)


def quantization_section(plan: Int8Plan, options: QuantizeOptions, calib, gate: gating.GateResult, final: Path,
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


def write_int8(source: art.Artifact, onnx_artifact: art.Artifact, out: Path, overwrite: bool, final: Path,
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
                                 opset=opset_of(staging / art.ONNX_FILE), dtype="int8",
                                 optimize=previous.get("optimize", "basic"), dynamic=tuple(previous.get("dynamic", ())))
        if decoder is not None and decoder.path is not None:
            onnx_files.place(decoder.path, staging / decoder.path.name, onnx_files.has_external_data(decoder.path))
            onnx_meta["decoder"] = decoder.section
        onnx_artifact.copy_tokenizer(staging)
        for name, path in (files or {}).items():
            shutil.copyfile(path, staging / name)
        config = {**onnx_artifact.config, "onnx": onnx_meta, "quantization": section}
        return art.write_metadata(
            staging, config=config, stage="quantize", parent=source, options=options_record(options, mode),
            metrics=manifest_metrics(report), extra={"report": report, "quantization": section, "gate": gate.as_dict()})


def opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 0)

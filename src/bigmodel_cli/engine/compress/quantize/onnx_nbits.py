"""``--mode matmul-nbits``: weight-only int4/int8 for ONNX Runtime (its ``MatMulNBits`` operator).

Decoding at batch 1 reads every weight once per token, so it is bound by memory bandwidth; weights
stored in 4 bits (a float scale — and with ``symmetric=False`` a zero point — per block of
``--group-size`` weights along the input dimension) are read 8× faster than float32 and pay even
on CPUs without int8 dot-product instructions. ONNX Runtime's own quantizer
(``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``) rewrites every MatMul
with a constant weight; activations stay float. ``--accuracy-level`` picks the kernel's compute
type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 — int8 is the fast path on CPUs with VNNI).

Both graphs of a language-model export are quantized: ``model.onnx`` (cache-free: perplexity and
the accuracy gate) and ``decoder.onnx`` (past key values: prefill and decode tokens/s before and
after, measured with the same cached ORT decoder generate uses).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from bigmodel_cli import artifact as art
from bigmodel_cli.errors import UserError

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
BENCH_PROMPT, BENCH_NEW = 16, 32  # tokens of the timed prompt and of the timed greedy decode


def options_problems(bits: int, group_size: int, accuracy_level: int | None) -> list[str]:
    problems = []
    if bits not in (4, 8):
        problems.append(f"--bits {bits}: MatMulNBits stores 4 or 8 bits per weight")
    if group_size < 16 or group_size & (group_size - 1):
        problems.append(f"--group-size {group_size}: MatMulNBits needs a power of two of at least 16 (e.g. 32, 64, 128)")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        problems.append(f"--accuracy-level {accuracy_level}: choose 0 (unset), 1 fp32, 2 fp16, 3 bf16 or 4 int8")
    return problems


def quantize_file(src: Path, dst: Path, bits: int, block_size: int, symmetric: bool, accuracy_level: int | None) -> int:
    """Rewrite ``src``'s constant-weight MatMuls as MatMulNBits into ``dst``; returns how many."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from ...core.quiet import silenced

    model = onnx.load(str(src))
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                          accuracy_level=accuracy_level, bits=bits)
    with silenced("onnxruntime", "onnxruntime.quantization"):
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, algo_config=config)
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return sum(1 for node in quantizer.model.model.graph.node if node.op_type == "MatMulNBits")


def decode_speed(decoder_path: Path, section: dict, context: int, vocab: int, threads: int | None) -> dict:
    """Prefill tokens/s (a BENCH_PROMPT-token prompt) and decode tokens/s (BENCH_NEW greedy steps)
    of a decoder.onnx, with the cached ORT decoder generate uses; the median of three runs."""
    from ...onnx.decoder import OrtCachedDecoder
    from ...onnx.runtime import open_session

    session, _ = open_session(decoder_path, threads=threads)
    decoder = OrtCachedDecoder(session, section, context, vocab)
    prompt = list(np.random.default_rng(0).integers(0, vocab, min(BENCH_PROMPT, context // 2)))
    steps = max(1, min(BENCH_NEW, context - len(prompt) - 1))
    prefill, decode = [], []
    for _ in range(3):
        start = time.perf_counter()
        logits = decoder.start(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(steps):
            logits = decoder.step(int(np.argmax(logits)))
        decode.append(steps / (time.perf_counter() - start))
    return {"prefill_tokens_per_s": float(np.median(prefill)), "decode_tokens_per_s": float(np.median(decode)),
            "prompt_tokens": len(prompt), "decode_steps": steps, "repeats": 3}


def quantize_nbits(source: art.Artifact, out: Path, options, overwrite: bool, tmp: Path, say, options_record: dict):
    """Quantize an export's graphs with MatMulNBits, gate on the task metric (perplexity), time the
    cached decoder before and after, write the artifact. Returns (report, section, gate, manifest)."""
    from ...onnx.export import compare_outputs, reference_inputs, io_layout, onnx_section
    from ...onnx.runtime import open_session, session_predict
    from . import gate as gating
    from .measure import Evaluator, build_report, manifest_metrics, model_bytes

    onnx_meta = source.config.get("onnx") or {}
    decoder_meta = onnx_meta.get("decoder")
    if decoder_meta:  # an older decoder would be quantized, then not run: ask for the re-export first
        from ...onnx.decoder import check_decoder_section

        check_decoder_section(decoder_meta, str(source.path))
    say("stage", name="quantize")
    graphs = [art.ONNX_FILE] + (["decoder.onnx"] if decoder_meta else [])
    counts = {}
    for name in graphs:
        counts[name] = quantize_file(source.path / name, tmp / name, options.bits, options.group_size,
                                     options.symmetric, options.accuracy_level)
    if not counts[art.ONNX_FILE]:
        raise UserError(f"{source.path}: model.onnx has no MatMul with a constant weight for MatMulNBits to quantize; "
                        "use --mode dynamic")
    say("stage", name="evaluate")
    evaluator = Evaluator(source, options.split, options.limit)
    reference = session_predict(open_session(source.path / art.ONNX_FILE, threads=options.threads)[0])
    candidate = session_predict(open_session(tmp / art.ONNX_FILE, threads=options.threads)[0])
    before, after = evaluator(reference), evaluator(candidate)
    gate = gating.run_gate(task=source.task, limit=options.max_metric_drop, before=before, first=after,
                           rank=lambda: [], retry=lambda excluded: after, max_retries=0, progress=say)
    if not gate.passed:
        raise gating.failure(gate)
    layout = io_layout(source)
    error = compare_outputs(reference, candidate, reference_inputs(layout, layout.verify_shapes()[:2]))
    error.pop("shapes", None)
    report = build_report(source.task, {**before, "file_bytes": model_bytes(source.path / art.ONNX_FILE)},
                          {**after, "file_bytes": model_bytes(tmp / art.ONNX_FILE)}, None)
    report["output_error"] = error
    if decoder_meta:
        say("stage", name="bench")
        context, vocab = int(layout.context), int(layout.vocab_size)
        report["decode_before"] = decode_speed(source.path / "decoder.onnx", decoder_meta, context, vocab, options.threads)
        report["decode_after"] = decode_speed(tmp / "decoder.onnx", decoder_meta, context, vocab, options.threads)
        report["decode_speedup"] = (report["decode_after"]["decode_tokens_per_s"]
                                    / report["decode_before"]["decode_tokens_per_s"])
    section = {"mode": "matmul-nbits", "bits": options.bits, "block_size": options.group_size,
               "symmetric": options.symmetric, "accuracy_level": options.accuracy_level,
               "operator": "com.microsoft.MatMulNBits", "quantized_matmuls": counts, "output_error": error}
    say("stage", name="write")
    with art.atomic_directory(out, overwrite, [source.path]) as staging:
        for name in graphs:
            shutil.copyfile(tmp / name, staging / name)
        source.copy_tokenizer(staging)
        new_onnx = onnx_section(staging / art.ONNX_FILE, exporter=onnx_meta.get("exporter", "unknown"),
                                opset=onnx_meta.get("opset", 0), dtype="fp32", optimize=onnx_meta.get("optimize", "none"),
                                dynamic=tuple(onnx_meta.get("dynamic") or ()))
        if decoder_meta:
            new_onnx["decoder"] = decoder_meta
        config = {**source.config, "onnx": new_onnx, "quantization": section}
        manifest = art.write_metadata(
            staging, config=config, stage="quantize", parent=source, options=options_record,
            metrics={**manifest_metrics(report), "output_max_abs_diff": error["max_abs_diff"]},
            extra={"report": report, "quantization": section, "gate": gate.as_dict()})
    return report, section, gate.as_dict(), manifest

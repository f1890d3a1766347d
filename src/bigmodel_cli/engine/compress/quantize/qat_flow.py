"""The ``--qat`` flow of ``bigmodel quantize``: post-training static int8 first (the baseline row),
then fake-quantized fine-tuning (qat.py) through the training loop, and the QDQ export of the
trained weights with their scales, measured and gated like any int8 model (int8_flow.py's steps).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from bigmodel_cli import artifact as art
from .measure import Evaluator, build_report, model_bytes, onnx_predict
from .options import QuantizeOptions, QuantizeResult
from .int8_flow import (Int8Attempts, calibration_inputs, fp32_artifact, plan_int8, quantization_section,
                        shipped_file, timed, write_int8)


def qat_int8(source: art.Artifact, out: Path, options: QuantizeOptions, overwrite: bool, tmp: Path,
              say: Callable) -> QuantizeResult:
    """Quantization-aware training, in named steps: post-training static int8 of the source (the
    row QAT must beat, and the scheme the simulation copies), fine-tuning with int8 simulated
    (qat.py), static QDQ of the trained weights with its own calibration, the accuracy gate against
    the fp32 model, the four-row report, and an artifact holding the int8 model.onnx and the fp32
    shadow weights (model.safetensors). Both int8 models are per channel, as simulated."""
    from .qat import quantizable_layers

    quantizable_layers(source.build_model())  # a layer the simulation cannot place: refused before any work
    options = dataclasses.replace(options, per_channel=True)
    calib = calibration_inputs(source, options, "static")
    ptq = static_attempt(source, options, calib, tmp / "ptq", say)
    # Where the full flow would quantize more than the weight layers (attention, embeddings: any
    # transformer), the export quantizes only what is simulated (qat.py's docstring says why).
    from .onnx_int8 import quantizes_beyond_weight_layers

    layers_only = quantizes_beyond_weight_layers(ptq.plan.graph)
    say("stage", name="finetune")
    trained = qat_finetune(source, options, calib, ptq.plan.scheme, tmp, say, quantize_output=not layers_only)
    shadow = art.open_artifact(trained["best_dir"])
    qat = static_attempt(shadow, options, calib, tmp / "qat", say, before=ptq.before, weight_layers_only=layers_only)
    gate = qat.gate()
    final = shipped_file(qat.path, tmp / "qat")
    ptq_final = shipped_file(ptq.path, tmp / "ptq")
    say("stage", name="evaluate")
    agreement = qat_agreement(trained["model"], final, qat.evaluator, options.threads)
    report = qat_report(source, options, ptq, qat, ptq_final, final, say)
    report["qat"] = {**{k: v for k, v in trained.items() if k not in ("best_dir", "model", "quantized_layers", "activations")},
                     "simulated_vs_onnx": agreement, **qat_selection(trained)}
    section = {**quantization_section(qat.plan, options, calib, gate, final, None),
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
    manifest = write_int8(source, onnx_artifact, out, overwrite, final, options, "static", report, section, gate,
                           files)
    return QuantizeResult(out, "static", report, section, gate.as_dict(), manifest)


KEPT_START = "fine-tuning did not improve on the calibrated model; kept step 0"


def qat_selection(trained: dict) -> dict:
    """Which step's weights ship, in words: the training loop evaluates the calibrated simulation
    before the first step too, and keeps it unless a step beats it on the validation split."""
    kept_start = trained["best_step"] == 0
    said = KEPT_START if kept_start else f"kept step {trained['best_step']} of {trained['steps']} (best on the val split)"
    return {"kept_start": kept_start, "selection": said}


def static_attempt(source: art.Artifact, options: QuantizeOptions, calib, tmp: Path, say: Callable,
                    before: dict | None = None, weight_layers_only: bool = False) -> Int8Attempts:
    """Static QDQ int8 of ``source`` in its own work directory, quantized and measured; ``before``
    replaces its fp32 metrics (QAT measures against the original fp32 model); ``weight_layers_only``:
    quantize the weight layers only (onnx_int8.weight_layer_nodes)."""
    tmp.mkdir()
    onnx_artifact, _ = fp32_artifact(source, options, tmp, say)
    plan = plan_int8(onnx_artifact.path / art.ONNX_FILE, tmp, options, "static", say)
    if weight_layers_only:
        plan.settings = dataclasses.replace(plan.settings, weight_layers_only=True)
        plan.sensitive = []  # nothing but the weight layers is quantized: nothing else to keep in float
    attempts = Int8Attempts(source, plan, calib, options, tmp, say)
    attempts.quantize_first()
    attempts.measure_first()
    if before is not None:
        attempts.before = before
    return attempts


def qat_finetune(source: art.Artifact, options: QuantizeOptions, calib, scheme, tmp: Path, say: Callable,
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


def qat_agreement(model, int8: Path, evaluator: Evaluator, threads: int | None) -> dict:
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


def qat_report(source: art.Artifact, options: QuantizeOptions, ptq: Int8Attempts, qat: Int8Attempts,
                ptq_final: Path, final: Path, say: Callable) -> dict:
    """fp32 (before), post-training static int8 (ptq) and QAT int8 (after), side by side."""
    fp32 = ptq.plan.fp32
    timing = timed(options, {"before": fp32, "ptq": ptq_final, "after": final}, source, ptq.evaluator, say)
    report = build_report(source.task, {**ptq.before, "file_bytes": model_bytes(fp32)},
                          {**qat.latest, "file_bytes": model_bytes(final)}, timing)
    report["ptq"] = {**ptq.latest, "file_bytes": model_bytes(ptq_final), **((timing or {}).get("ptq") or {})}
    return report

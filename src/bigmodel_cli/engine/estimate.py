"""``bigmodel estimate``: parameters, memory and FLOPs of a model, built on the meta device.

Nothing is allocated: the model is constructed with ``torch.device("meta")`` and FLOPs are counted
by ``torch.utils.flop_counter`` on a meta input. Training memory = weights + gradients + optimizer
state (AdamW: two fp32 moments; mixed precision keeps fp32 master weights) + activations.
Activations of a GPT follow Korthikanti et al. 2022 ("Reducing Activation Recomputation"), with a
fused attention kernel (no stored attention matrix): 34·s·b·h bytes per layer in 16-bit, plus the
logits; other models sum the outputs of their leaf modules.
"""

from __future__ import annotations

from ..errors import UserError
from ..models import LM_ARCHS, build_model, count_parameters, resolve_spec

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def _flops_forward(model, example) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops()


def _leaf_activation_elements(model, example) -> int:
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        total += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return total


def estimate(arch: str, preset: str | None = None, overrides: dict | None = None, precision: str = "bf16",
             batch_size: int = 1, seq_len: int | None = None) -> dict:
    import torch

    if precision not in BYTES:
        raise UserError(f"unknown --precision {precision!r} for estimate; choose one of {', '.join(BYTES)}")
    if batch_size < 1 or (seq_len is not None and seq_len < 1):
        raise UserError("--batch-size and --seq-len must be at least 1")
    spec = resolve_spec(arch, preset, overrides)
    with torch.device("meta"):
        model = build_model(spec)
    params = count_parameters(model)
    b = BYTES[precision]
    if spec["arch"] in LM_ARCHS:
        seq = seq_len or spec["block_size"]
        if seq > spec["block_size"]:
            raise UserError(f"--seq-len {seq} is longer than the model's context ({spec['block_size']})")
        example = torch.zeros(batch_size, seq, dtype=torch.long, device="meta")
        flops = _flops_forward(model, example)
        per_layer = 34 * seq * batch_size * spec["n_embd"] * (b / 2)
        logits = batch_size * seq * spec["vocab_size"] * 4 * 2  # fp32 logits and their gradient
        activations = spec["n_layer"] * per_layer + logits
        tokens = batch_size * seq
    else:
        shape = [spec["in_channels"], spec["height"], spec["width"]] if spec["arch"] == "cnn" else [spec["input_size"]]
        example = torch.zeros(batch_size, *shape, device="meta")
        flops = _flops_forward(model, example)
        activations = _leaf_activation_elements(model, example) * b
        tokens = batch_size
    master = 4 if precision != "fp32" else 0  # mixed precision keeps fp32 master weights
    weights = params * b
    grads = params * b
    optimizer_state = params * 8  # AdamW: exp_avg and exp_avg_sq in fp32
    return {
        "model": spec,
        "precision": precision,
        "batch_size": batch_size,
        "seq_len": seq_len if spec["arch"] not in LM_ARCHS else (seq_len or spec["block_size"]),
        "params": params,
        "weight_bytes": weights,
        "train": {
            "weights": weights + params * master,
            "gradients": grads,
            "optimizer_state": optimizer_state,
            "activations": int(activations),
            "total": int(weights + params * master + grads + optimizer_state + activations),
        },
        "flops_per_token_forward": flops / tokens,
        "flops_per_token_train": 3 * flops / tokens,
    }

"""The ONNX decoder with past key values (``decoder.onnx``): one graph for prefill and decode.

Inputs: ``input_ids`` (batch, seq) and, per layer i, ``past_key_values.{i}.key`` / ``.value``
(batch, kv_heads, past, head_dim) — an empty past (past = 0) is the prefill. Outputs: ``logits``
(batch, seq, vocab) and ``present.{i}.key`` / ``.value`` (batch, kv_heads, past + seq, head_dim),
which the caller feeds back as the next step's past. Positions are implied by the past's length
(position of the first new token = past), the layout Optimum's decoders use without an attention
mask: every row of a batch has the same length, so no mask is needed and there is one input less
to feed each step. Left-padded batches are not served by this graph.

The names, the layer count and ``DECODER_VERSION`` are recorded in config.json's ``onnx.decoder``
section; a runtime that finds another version (or none) refuses in one line and asks for a
re-export. The TorchScript exporter is used: it keeps every shape symbolic through the cache path
(the dynamo exporter specialises a zero-length past away).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UserError, WorkFailed
from . import files as onnx_files

DECODER_FILE = "decoder.onnx"
DECODER_VERSION = 1
INPUT_IDS = "input_ids"
TRACE_PAST, TRACE_SEQ = 3, 2  # tracing example; verification uses other lengths, including past 0
VERIFY_PROMPT, VERIFY_STEPS = 5, 4


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def cache_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a gpt or llama module."""
    cfg = model.config
    heads = getattr(cfg, "n_kv_head", None) or cfg.n_head
    return cfg.n_layer, int(heads), int(cfg.head_dim)


def supports_decoder(model) -> bool:
    """A module whose ``forward(idx, past, use_cache)`` returns (logits, present)."""
    import inspect

    return "use_cache" in inspect.signature(model.forward).parameters and hasattr(model, "config")


def decoder_module(model):
    """The model with a flat signature the exporter can name: ids, then past key/value per layer."""
    import torch

    class CachedDecoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, *flat_past):
            past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(len(flat_past) // 2)]
            logits, present = self.model(input_ids, past=past, use_cache=True)
            return (logits, *[t for pair in present for t in pair])

    return CachedDecoder(model).eval()


def empty_past(model, batch: int, length: int = 0, seed: int | None = None) -> list[np.ndarray]:
    layers, heads, dim = cache_shape(model)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, heads, length, dim)).astype(np.float32) for _ in range(2 * layers)]


def export_decoder(model, path: Path, opset: int, vocab_size: int) -> None:
    """Write the cache graph to ``path`` (one file; the data file beside it when large)."""
    import torch

    from .exporters import needs_external_data, weight_bytes

    layers, _, _ = cache_shape(model)
    module = decoder_module(model)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, vocab_size, (2, TRACE_SEQ)).astype(np.int64))
    past = [torch.from_numpy(p) for p in empty_past(model, 2, TRACE_PAST, seed=2)]
    past_in, present_out = past_names(layers), present_names(layers)
    axes = {INPUT_IDS: {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past_in})
    axes.update({n: {0: "batch", 2: "total"} for n in present_out})
    external = needs_external_data(weight_bytes(module))
    scratch = path.parent / ".decoder"
    scratch.mkdir()
    try:
        written = scratch / path.name
        try:
            from .exporters import quiet_exporters

            with quiet_exporters(), torch.no_grad():
                torch.onnx.export(module, (ids, *past), str(written), input_names=[INPUT_IDS, *past_in],
                                  output_names=["logits", *present_out], opset_version=min(opset, 20),
                                  dynamic_axes=axes, dynamo=False, do_constant_folding=True)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # the exporter raises many types; summarised in one line
            from .exporters import exporter_reason

            raise UserError(f"the model's cached decoder cannot be exported to ONNX ({exporter_reason(exc)}); "
                            "export with --no-decoder to write the cache-free graph only") from None
        onnx_files.place(written, path, external)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def verify_decoder(model, session, vocab_size: int, atol: float) -> dict:
    """Prefill (empty past) and several one-token decode steps, ONNX Runtime against PyTorch, at
    batch 1 and 3; the ORT present is fed back as its own next past, so errors would accumulate."""
    import torch

    layers, _, _ = cache_shape(model)
    names = [INPUT_IDS, *past_names(layers)]
    max_abs, max_ref, steps = 0.0, 0.0, 0
    rng = np.random.default_rng(3)
    for batch in (1, 3):
        ids = rng.integers(0, vocab_size, (batch, VERIFY_PROMPT)).astype(np.int64)
        past_ort = empty_past(model, batch)
        past_pt = None
        for step in range(VERIFY_STEPS + 1):
            outs = session.run(None, dict(zip(names, [ids, *past_ort])))
            with torch.inference_mode():
                ref, past_pt = model(torch.from_numpy(ids), past=past_pt, use_cache=True)
            ref = ref.float().numpy()
            if outs[0].shape != ref.shape or not np.isfinite(outs[0]).all():
                raise WorkFailed(f"verification failed: the cached decoder gives logits {list(outs[0].shape)} "
                                 f"(PyTorch {list(ref.shape)}) at step {step}; nothing was written")
            max_abs = max(max_abs, float(np.abs(ref - outs[0]).max()))
            max_ref = max(max_ref, float(np.abs(ref).max()))
            steps += 1
            past_ort = list(outs[1:])
            ids = ref[:, -1].argmax(-1)[:, None].astype(np.int64)
    figures = {"max_abs_diff": max_abs, "max_rel_diff": max_abs / max_ref if max_ref else 0.0,
               "steps": steps, "prefill_length": VERIFY_PROMPT, "decode_steps": VERIFY_STEPS, "batches": [1, 3],
               "atol": atol, "passed": max_abs <= atol}
    if not figures["passed"]:
        raise WorkFailed(f"verification failed: the cached decoder differs from PyTorch by up to {max_abs:.3g} "
                         f"(--atol {atol:g}); nothing was written")
    return figures


def decoder_section(n_layer: int, kv_heads: int, head_dim: int) -> dict:
    """config.json's ``onnx.decoder``: what a runtime needs to drive the cache graph."""
    return {"file": DECODER_FILE, "version": DECODER_VERSION, "inputs": [INPUT_IDS, *past_names(n_layer)],
            "outputs": ["logits", *present_names(n_layer)], "n_layer": n_layer, "kv_heads": kv_heads,
            "head_dim": head_dim, "positions": "past_length", "attention_mask": False}


def check_decoder_section(section: dict | None, where: str) -> dict:
    """The recorded decoder section, or one line asking for a re-export when it is another version."""
    if not isinstance(section, dict) or section.get("version") != DECODER_VERSION:
        found = section.get("version") if isinstance(section, dict) else None
        raise UserError(f"{where}: its cached decoder (decoder.onnx) is format version {found}, this bigmodel reads "
                        f"version {DECODER_VERSION}; re-export it (bigmodel export PARENT --out DIR) or use --no-cache")
    return section


class OrtCachedDecoder:
    """Next-token logits from decoder.onnx on ONNX Runtime, the cache kept in ORT.

    Each step binds the previous step's ``present`` OrtValues as the new ``past`` inputs (IO
    binding), so the cache never goes through numpy; only the last position's logits are copied
    out. The window slides as on PyTorch (generate.CachedTorchDecoder): once the context outgrows
    it, the step re-prefills the last ``context`` tokens from an empty past.
    """

    def __init__(self, session, section: dict, context: int, vocab: int):
        self.session, self.context, self.vocab = session, context, vocab
        self.past_names = past_names(int(section["n_layer"]))
        self.present_names = present_names(int(section["n_layer"]))
        self.empty = np.zeros((1, int(section["kv_heads"]), 0, int(section["head_dim"])), dtype=np.float32)
        self.tokens: list[int] = []
        self.past: list | None = None
        self.cache_bytes = 0  # the largest the cache has been
        self.prefills = 0

    def start(self, prompt: list[int]) -> np.ndarray:
        self.tokens = list(prompt)
        return self.run(self.tokens[-self.context:], past=None)

    def step(self, token: int) -> np.ndarray:
        self.tokens.append(token)
        if len(self.tokens) > self.context:  # the window slides: positions restart, re-prefill
            return self.run(self.tokens[-self.context:], past=None)
        return self.run([token], past=self.past)

    def run(self, ids: list[int], past) -> np.ndarray:
        """Feed ``ids`` after ``past``; keep the new cache (as OrtValues); the last position's logits."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, np.asarray([ids], dtype=np.int64))
        if past is None:
            self.prefills += 1
            for name in self.past_names:
                binding.bind_cpu_input(name, self.empty)
        else:
            for name, value in zip(self.past_names, past):
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")
        for name in self.present_names:
            binding.bind_output(name)  # ORT allocates; the OrtValue is the next step's past
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = outputs[1:]
        self.cache_bytes = max(self.cache_bytes, sum(int(np.prod(v.shape())) * 4 for v in self.past))
        return outputs[0].numpy()[0, -1, :self.vocab]


def open_ort_decoder(artifact_path: Path, section: dict | None, context: int, vocab: int, device: str,
                     threads: int | None) -> OrtCachedDecoder:
    """The cached ORT decoder of an export artifact, after checking its recorded version."""
    from .runtime import open_session

    section = check_decoder_section(section, str(artifact_path))
    path = artifact_path / DECODER_FILE
    if not path.is_file():
        raise UserError(f"{artifact_path}: config.json records a cached decoder but decoder.onnx is missing; "
                        "re-export it (bigmodel export PARENT --out DIR) or use --no-cache")
    if onnx_files.has_external_data(path):
        # only model.onnx's data file is verified (artifact_files); the decoder must be one file
        raise UserError(f"{path}: refers to external data, which a cached decoder may not; re-export it "
                        "(bigmodel export PARENT --out DIR) or use --no-cache")
    session, _ = open_session(path, device=device, threads=threads)
    return OrtCachedDecoder(session, section, context, vocab)

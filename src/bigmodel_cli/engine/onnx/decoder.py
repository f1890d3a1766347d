"""The ONNX decoder with past key values (``decoder.onnx``): one graph for prefill and decode.

Inputs, in the order and with the names of Optimum's / transformers' decoders: ``input_ids``
(batch, seq), ``attention_mask`` (batch, past + seq; 1 = a real token, 0 = padding), ``position_ids``
(batch, seq) and, per layer i, ``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads, past,
head_dim) — an empty past (past = 0) is the prefill. Outputs: ``logits`` (batch, seq, vocab) and
``present.{i}.key`` / ``.value`` (batch, kv_heads, past + seq, head_dim), which the caller feeds back
as the next step's past. Prompts of different lengths share a batch LEFT-padded: the mask hides the
padding from every query, and each row's positions count from its own first real token
(``position_ids = max(cumsum(attention_mask) - 1, 0)``, the rule transformers' ``generate`` uses;
``position_ids`` is an input rather than derived inside the graph, as Optimum's Llama decoders
take it, so a caller may also feed its own). Version 1 had neither input (positions were the past's
length), so it could not serve a padded batch.

The names, the layer count and ``DECODER_VERSION`` are recorded in config.json's ``onnx.decoder``
section; a runtime that finds another version (or none) refuses in one line and asks for a
re-export. The TorchScript exporter is used: it keeps every shape symbolic through the cache path
(the dynamo exporter specialises a zero-length past away). A model whose weights pass protobuf's
2 GB limit gets its decoder's weights in ``decoder.onnx.data`` beside it (the canonical layout of
``files.place``), listed and hashed in the manifest like ``model.onnx.data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...artifact import DECODER_FILE, may_have_external_data
from ...errors import UserError, WorkFailed
from . import files as onnx_files

DECODER_VERSION = 2
INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
INPUTS = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
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
    """The model with a flat signature the exporter can name: ids, mask, positions, then past
    key/value per layer."""
    import torch

    class CachedDecoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask, position_ids, *flat_past):
            past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(len(flat_past) // 2)]
            logits, present = self.model(input_ids, past=past, use_cache=True, attention_mask=attention_mask,
                                         position_ids=position_ids)
            return (logits, *[t for pair in present for t in pair])

    return CachedDecoder(model).eval()


def empty_past(model, batch: int, length: int = 0, seed: int | None = None) -> list[np.ndarray]:
    layers, heads, dim = cache_shape(model)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, heads, length, dim)).astype(np.float32) for _ in range(2 * layers)]


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids → (input_ids, attention_mask), both (batch, longest row) int64, each row
    padded on the LEFT (id 0, mask 0) so that every row's next token comes at the same column."""
    width = max(len(row) for row in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def position_ids(mask: np.ndarray, seq: int) -> np.ndarray:
    """The positions of the last ``seq`` columns of each row: its real tokens counted from 0,
    padding at 0 (models/gpt.padded_positions, in numpy)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, mask.shape[1] - seq:].astype(np.int64)


def export_decoder(model, path: Path, opset: int, vocab_size: int) -> None:
    """Write the cache graph to ``path`` (one file; the data file beside it when large)."""
    import torch

    from .exporters import needs_external_data, weight_bytes

    layers, _, _ = cache_shape(model)
    module = decoder_module(model)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, vocab_size, (2, TRACE_SEQ)).astype(np.int64))
    mask = np.ones((2, TRACE_PAST + TRACE_SEQ), dtype=np.int64)
    mask[1, 0] = 0  # a left-padded row
    positions = torch.from_numpy(position_ids(mask, TRACE_SEQ))
    past = [torch.from_numpy(p) for p in empty_past(model, 2, TRACE_PAST, seed=2)]
    past_in, present_out = past_names(layers), present_names(layers)
    axes = {INPUT_IDS: {0: "batch", 1: "seq"}, ATTENTION_MASK: {0: "batch", 1: "total"},
            POSITION_IDS: {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
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
                torch.onnx.export(module, (ids, torch.from_numpy(mask), positions, *past), str(written),
                                  input_names=[*INPUTS, *past_in],
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
    batch 1, 3, and 3 left-padded (prompts of 5, 3 and 1 tokens); the ORT present is fed back as
    its own next past, so errors would accumulate. The padded batch is also checked row by row
    against PyTorch run on each prompt alone, unpadded: the mask and the positions must make
    padding invisible, not merely agree between runtimes."""
    layers, _, _ = cache_shape(model)
    rng = np.random.default_rng(3)
    max_abs, max_ref, steps = 0.0, 0.0, 0
    batches = {"batch 1": [rng.integers(0, vocab_size, VERIFY_PROMPT).tolist()],
               "batch 3": [rng.integers(0, vocab_size, VERIFY_PROMPT).tolist() for _ in range(3)],
               "left-padded batch 3": [rng.integers(0, vocab_size, n).tolist() for n in (VERIFY_PROMPT, 3, 1)]}
    for label, rows in batches.items():
        for step, ort_last, ref_last in decode_pairs(model, session, rows):
            max_abs = max(max_abs, float(np.abs(ref_last - ort_last).max()))
            max_ref = max(max_ref, float(np.abs(ref_last).max()))
            steps += 1
    figures = {"max_abs_diff": max_abs, "max_rel_diff": max_abs / max_ref if max_ref else 0.0,
               "steps": steps, "prefill_length": VERIFY_PROMPT, "decode_steps": VERIFY_STEPS,
               "batches": list(batches), "atol": atol, "passed": max_abs <= atol}
    if not figures["passed"]:
        raise WorkFailed(f"verification failed: the cached decoder differs from PyTorch by up to {max_abs:.3g} "
                         f"(--atol {atol:g}); nothing was written")
    return figures


def decode_pairs(model, session, rows: list[list[int]]):
    """Yield (step, ORT's last-position logits, PyTorch's) for a prefill of ``rows`` (left-padded
    together) and ``VERIFY_STEPS`` greedy steps; PyTorch runs each row alone, unpadded."""
    import torch

    layers, _, _ = cache_shape(model)
    names = [*INPUTS, *past_names(layers)]
    ids, mask = left_pad(rows)
    past_ort = empty_past(model, len(rows))
    past_pt: list = [None] * len(rows)
    for step in range(VERIFY_STEPS + 1):
        outs = session.run(None, dict(zip(names, [ids, mask, position_ids(mask, ids.shape[1]), *past_ort])))
        refs = []
        with torch.inference_mode():
            for i, row in enumerate(rows):
                fed = torch.tensor([row if step == 0 else [int(ids[i, -1])]])
                ref, past_pt[i] = model(fed, past=past_pt[i], use_cache=True)
                refs.append(ref[0, -1].float().numpy())
        ref_last = np.stack(refs)
        if outs[0].shape[:2] != ids.shape or outs[0].shape[2] != ref_last.shape[1] or not np.isfinite(outs[0]).all():
            raise WorkFailed(f"verification failed: the cached decoder gives logits {list(outs[0].shape)} for input "
                             f"{list(ids.shape)} at step {step}; nothing was written")
        yield step, outs[0][:, -1], ref_last
        past_ort = list(outs[1:])
        ids = ref_last.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)


def prefill_predict(session, section: dict):
    """decoder.onnx as a cache-free model: token ids (batch, seq) → logits (batch, seq, vocab), by a
    prefill from an empty past with every position real. It lets a derived decoder (quantized) be
    measured with the same task metric as model.onnx."""
    names = [*INPUTS, *past_names(int(section["n_layer"]))]
    kv_heads, head_dim = int(section["kv_heads"]), int(section["head_dim"])

    def predict(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.ones_like(ids)
        empty = np.zeros((len(ids), kv_heads, 0, head_dim), dtype=np.float32)
        feeds = [ids, mask, position_ids(mask, ids.shape[1])] + [empty] * (len(names) - len(INPUTS))
        return session.run(["logits"], dict(zip(names, feeds)))[0]

    return predict


def decoder_section(n_layer: int, kv_heads: int, head_dim: int) -> dict:
    """config.json's ``onnx.decoder``: what a runtime needs to drive the cache graph."""
    return {"file": DECODER_FILE, "version": DECODER_VERSION, "inputs": [*INPUTS, *past_names(n_layer)],
            "outputs": ["logits", *present_names(n_layer)], "n_layer": n_layer, "kv_heads": kv_heads,
            "head_dim": head_dim, "positions": POSITION_IDS, "attention_mask": True, "padding": "left"}


def check_decoder_section(section: dict | None, where: str) -> dict:
    """The recorded decoder section, or one line asking for a re-export when it is another version."""
    if not isinstance(section, dict) or section.get("version") != DECODER_VERSION:
        found = section.get("version") if isinstance(section, dict) else None
        raise UserError(f"{where}: its cached decoder (decoder.onnx) is format version {found}, this bigmodel reads "
                        f"version {DECODER_VERSION}; re-export it (bigmodel export PARENT --out DIR) or use --no-cache")
    return section


class RowDecoder:
    """A decoder of a batch of rows (``start_batch``, ``step_batch``: next-token logits per row),
    with ``start``/``step``, its one-row forms."""

    def start(self, prompt: list[int]) -> np.ndarray:
        return self.start_batch([prompt])[0]

    def step(self, token: int) -> np.ndarray:
        return self.step_batch([token])[0]

    def start_batch(self, prompts: list[list[int]]) -> np.ndarray:
        raise NotImplementedError

    def step_batch(self, tokens: list[int]) -> np.ndarray:
        raise NotImplementedError


class PaddedCacheDecoder(RowDecoder):
    """A batch of rows decoded with a KV cache: the left padding, the attention mask and the
    positions, shared by PyTorch's decoder (decoders.CachedTorchDecoder) and ONNX Runtime's
    (OrtCachedDecoder), which only say how one forward pass runs (``run``).

    The prompts are prefilled once, left-padded together; each step then feeds one token per row,
    the mask growing by a column of ones. Once the longest row outgrows the window, every row
    re-prefills its last ``context`` tokens from an empty past: learned positions (gpt) must restart
    at 0 for the cropped window, as the cache-free path feeds it, and RoPE (llama) is re-prefilled
    the same way so that both paths compute the same numbers. A shorter row that had not slid yet
    is recomputed at the same positions, so its tokens do not change.
    """

    def __init__(self, context: int):
        self.context = context
        self.rows: list[list[int]] = []
        self.mask: np.ndarray | None = None
        self.past = None
        self.cache_bytes = 0  # the largest the cache has been
        self.prefills = 0

    def start_batch(self, prompts: list[list[int]]) -> np.ndarray:
        """Prefill the prompts; the next-token logits of each row (batch, vocab)."""
        self.rows = [list(prompt) for prompt in prompts]
        return self.prefill()

    def step_batch(self, tokens: list[int]) -> np.ndarray:
        """Append one token to each row; the next-token logits of each row (batch, vocab)."""
        for row, token in zip(self.rows, tokens):
            row.append(int(token))
        if max(len(row) for row in self.rows) > self.context:  # the window slides: positions restart
            return self.prefill()
        self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), dtype=np.int64)], axis=1)
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        return self.run(ids, self.mask, position_ids(self.mask, 1), self.past)

    def prefill(self) -> np.ndarray:
        self.prefills += 1
        ids, self.mask = left_pad([row[-self.context:] for row in self.rows])
        return self.run(ids, self.mask, position_ids(self.mask, ids.shape[1]), None)

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past) -> np.ndarray:
        """Feed ``ids`` after ``past``; keep the new cache in ``self.past``; the last position's logits."""
        raise NotImplementedError


class OrtCachedDecoder(PaddedCacheDecoder):
    """Next-token logits from decoder.onnx on ONNX Runtime, the cache kept in ORT.

    Each step binds the previous step's ``present`` OrtValues as the new ``past`` inputs (IO
    binding), so the cache never goes through numpy; only the last position's logits are copied
    out.
    """

    def __init__(self, session, section: dict, context: int, vocab: int):
        super().__init__(context)
        self.session, self.vocab = session, vocab
        self.past_names = past_names(int(section["n_layer"]))
        self.present_names = present_names(int(section["n_layer"]))
        self.kv_heads, self.head_dim = int(section["kv_heads"]), int(section["head_dim"])

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, ids)
        binding.bind_cpu_input(ATTENTION_MASK, mask)
        binding.bind_cpu_input(POSITION_IDS, positions)
        if past is None:
            empty = np.zeros((len(ids), self.kv_heads, 0, self.head_dim), dtype=np.float32)
            for name in self.past_names:
                binding.bind_cpu_input(name, empty)
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
        return outputs[0].numpy()[:, -1, :self.vocab]


def open_ort_decoder(artifact_path: Path, section: dict | None, context: int, vocab: int, device: str,
                     threads: int | None) -> OrtCachedDecoder:
    """The cached ORT decoder of an export artifact, after checking its recorded version."""
    from .runtime import open_session

    section = check_decoder_section(section, str(artifact_path))
    path = artifact_path / DECODER_FILE
    if not path.is_file():
        raise UserError(f"{artifact_path}: config.json records a cached decoder but decoder.onnx is missing; "
                        "re-export it (bigmodel export PARENT --out DIR) or use --no-cache")
    locations = onnx_files.external_locations(path) if may_have_external_data(path) else set()
    if locations - {onnx_files.data_path(path).name}:
        # only decoder.onnx.data is listed and verified (artifact_files); no other file is read as weights
        raise UserError(f"{path}: keeps weights in a file other than {onnx_files.data_path(path).name}, which is "
                        "the only one verified; re-export it (bigmodel export PARENT --out DIR) or use --no-cache")
    session, _ = open_session(path, device=device, threads=threads)
    return OrtCachedDecoder(session, section, context, vocab)

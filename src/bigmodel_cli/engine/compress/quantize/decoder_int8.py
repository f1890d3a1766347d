"""Dynamic int8 for the cached decoder (``decoder.onnx``) of a language-model export.

``quantize --mode dynamic`` quantizes model.onnx, the graph that ``eval`` and the accuracy gate
run; ``generate`` runs decoder.onnx (past key values). An int8 artifact without its decoder would
make every generated token recompute the whole context, so the decoder is quantized the same way
(ONNX Runtime's ``quantize_dynamic``, the same scheme and per-channel choice) and kept only when it
holds the same promise as model.onnx:

- its own task metric — the decoder run as a prefill over the same split — passes the same
  ``--max-metric-drop`` against the fp32 model;
- no node had to be kept in float, by the user (``--exclude``) or by the gate's retries: those are
  node names of model.onnx, which the decoder (another export of the same weights) does not share,
  so the two graphs could not be quantized alike.

Otherwise the artifact ships without a decoder and the report says why (``generate`` then
recomputes; re-export and quantize with ``--mode matmul-nbits`` to keep a cache).
Static QDQ is not applied to the decoder: calibrating it would need past key values as inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ....artifact import Artifact
from ....errors import UserError
from ...onnx.decoder import DECODER_FILE, DECODER_VERSION, check_decoder_section, prefill_predict

@dataclass
class DecoderResult:
    """What happened to the decoder: the file to ship (None: not kept), its config section, and
    the report's entry (metrics, decode speed before and after, or why it was not kept)."""
    path: Path | None = None
    section: dict | None = None
    report: dict = field(default_factory=dict)


def quantize_decoder(onnx_artifact: Artifact, mode: str, settings, excluded: list[str], before: dict,
                     limit: float | None, evaluator, tmp: Path, threads: int | None, bench: bool,
                     say: Callable) -> DecoderResult:
    """Quantize ``onnx_artifact``'s decoder.onnx like its model.onnx was (``settings``), measure and
    time it (``bench``); a DecoderResult (empty when the artifact has no decoder)."""
    from ...onnx import files as onnx_files
    from ...onnx.export import check_onnx_file
    from ...onnx.exporters import needs_external_data
    from ...onnx.runtime import open_session
    from .gate import drop_unit, metric_drop
    from .onnx_int8 import quantize_file

    section = (onnx_artifact.config.get("onnx") or {}).get("decoder")
    if not section:
        return DecoderResult()
    if mode != "dynamic":
        return DecoderResult(report={"kept": False, "why": "static QDQ needs the decoder's past key values "
                                     "calibrated; generate on this artifact recomputes the context"})
    try:
        check_decoder_section(section, str(onnx_artifact.path))
    except UserError:  # an older decoder would be quantized, then refused by generate: left out, said why
        return DecoderResult(report={"kept": False, "why": f"decoder.onnx is format version {section.get('version')}, "
                                     f"not {DECODER_VERSION}; re-export the model to quantize its cached decoder too"})
    if excluded:
        return DecoderResult(report={"kept": False, "why": f"{len(excluded)} node(s) of model.onnx stay in float "
                                     "(--exclude or the gate), which decoder.onnx cannot match by name; generate "
                                     "on this artifact recomputes the context"})
    say("stage", name="quantize decoder")
    work = tmp / "decoder-int8"
    work.mkdir()
    quantize_file(onnx_artifact.path / DECODER_FILE, work / "int8.onnx", settings, [])
    final = tmp / "decoder-final" / DECODER_FILE
    final.parent.mkdir()
    onnx_files.place(work / "int8.onnx", final, needs_external_data(onnx_files.total_bytes(work / "int8.onnx")))
    check_onnx_file(final)
    say("stage", name="evaluate decoder")
    after = evaluator(prefill_predict(open_session(final, threads=threads)[0], section))
    drop = metric_drop(onnx_artifact.task, before, after)
    report = {"kept": True, "metrics": after, "metric_drop": drop}
    if limit is not None and drop > limit:
        return DecoderResult(report={**report, "kept": False, "why": f"the int8 decoder loses {drop:.3g}"
                                     f"{drop_unit(onnx_artifact.task)} (over --max-metric-drop {limit:g}); generate "
                                     "on this artifact recomputes the context"})
    if bench:
        say("stage", name="bench decoder")
        report.update(decode_speeds(onnx_artifact, section, final, threads))
    return DecoderResult(final, section, report)


def decode_speeds(onnx_artifact: Artifact, section: dict, int8: Path, threads: int | None) -> dict:
    """Prefill and decode tokens/s of the fp32 decoder and the int8 one, as generate runs them."""
    from ...onnx.export import io_layout
    from .onnx_nbits import decode_speed

    layout = io_layout(onnx_artifact)
    context, vocab = int(layout.context), int(layout.vocab_size)
    before = decode_speed(onnx_artifact.path / DECODER_FILE, section, context, vocab, threads)
    after = decode_speed(int8, section, context, vocab, threads)
    return {"decode_before": before, "decode_after": after,
            "decode_speedup": after["decode_tokens_per_s"] / before["decode_tokens_per_s"]}

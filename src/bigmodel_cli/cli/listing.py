"""bigmodel models / datasets: what the registries hold."""

from __future__ import annotations

from . import console
from .options import JsonOpt


def models(json_out: JsonOpt = False) -> None:
    """List architectures and presets with their parameter counts (counted on the meta device)."""
    from ..models import ARCHS, human_count, meta_parameter_count, resolve_spec

    rows = []
    for arch in ARCHS.values():
        for preset in arch.presets:
            params = meta_parameter_count(resolve_spec(arch.name, preset))
            rows.append({"arch": arch.name, "preset": preset, "default": preset == arch.default_preset,
                         "params": params, "task": arch.task, "summary": arch.summary})
    if json_out:
        console.print_json(rows)
        return
    console.out.print(console.rows_table("models (--model NAME --preset PRESET; or --model file.py:Class)",
                                         ["model", "preset", "params", "architecture"],
                                         [(r["arch"], r["preset"] + (" *" if r["default"] else ""), human_count(r["params"]),
                                           r["summary"] if r["default"] else "") for r in rows]))
    console.note("* default preset. mlp/cnn counts are for digits-sized inputs; gpt and llama for the byte vocabulary where it is 256.")


def datasets(json_out: JsonOpt = False) -> None:
    """List the data sources that --data accepts."""
    from ..data import DATASETS

    if json_out:
        console.print_json([vars(k) for k in DATASETS.values()])
        return
    console.out.print(console.rows_table("datasets (--data)", ["name", "syntax", "task", "what"],
                                         [(k.name, k.syntax, k.task, k.summary) for k in DATASETS.values()]))

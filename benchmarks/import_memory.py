"""Peak resident memory of `bigmodel import` on a ~1 GB sharded checkpoint, side by side with the
obvious conversion (load every shard with safetensors, rename, ``save_file`` once).

The checkpoint is a Llama-shaped model with random float32 weights, written shard by shard with
safetensors (no transformers, no download). Each conversion runs in its own child process, which
reports its own peak RSS (VmHWM), so the two figures are independent.

    python benchmarks/import_memory.py [--layers 16] [--shard-mib 256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, machine, machine_line, write_section

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 1024, 2816, 32000, 16

# The peak resident memory of this process's own address space (VmHWM). Not ru_maxrss: Linux keeps
# that across exec, so a child would report at least what the benchmark itself held when it forked.
PEAK = """
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""
# The obvious conversion: every tensor in memory, then one save_file.
NAIVE = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from bigmodel_cli.engine.pretrained.hf_weights import our_name
src, out = Path(sys.argv[1]), Path(sys.argv[2])
index = json.loads((src / "model.safetensors.index.json").read_text())
state = {}
for shard in sorted(set(index["weight_map"].values())):
    for name, tensor in load_file(src / shard).items():
        state[our_name("llama", name)[0]] = tensor
save_file(state, out)
print(peak_kib())
"""
# bigmodel import, through its CLI entry point.
STREAMED = """
import sys
from bigmodel_cli.cli import app
try:
    app(["import", sys.argv[1], "--out", sys.argv[2], "--json"], prog_name="bigmodel", standalone_mode=False)
finally:
    print(peak_kib(), file=sys.stderr)
"""

# What the runtime alone takes: the CLI, torch and safetensors imported, nothing converted.
RUNTIME = """
import torch, safetensors.torch
from bigmodel_cli.cli import app
from bigmodel_cli.engine.pretrained import hf_import
print(peak_kib())
"""


def build_checkpoint(directory: Path, layers: int, shard_bytes: int) -> dict:
    """A random Llama-shaped checkpoint, sharded like save_pretrained's, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       **{p + f"self_attn.{x}_proj.weight": (HIDDEN, HIDDEN) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)})
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: torch.randn(shapes[n], generator=generator) * 0.02 for n in group}, directory / file,
                  metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    files = sorted(directory.glob("model-*.safetensors"))
    return {"bytes": sum(f.stat().st_size for f in files), "largest_shard": max(f.stat().st_size for f in files),
            "shards": len(files), "largest_tensor": 4 * max(math.prod(s) for s in shapes.values())}


def peak_mib(script: str, *args: str, stream: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PEAK + script, *args], capture_output=True, text=True, check=True, env=env)
    text = proc.stderr if stream == "stderr" else proc.stdout
    return int(text.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shard-mib", type=int, default=256)
    args = parser.parse_args()
    mib = 1024**2
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "hf"
        ckpt = build_checkpoint(source, args.layers, args.shard_mib * mib)
        streamed = peak_mib(STREAMED, str(source), f"{tmp}/artifact", stream="stderr")
        naive = peak_mib(NAIVE, str(source), f"{tmp}/naive.safetensors", stream="stdout")
        runtime = peak_mib(RUNTIME, stream="stdout")
    info = machine()
    md = f"""## Import memory (`benchmarks/import_memory.py`)

`bigmodel import` of a Llama-shaped float32 checkpoint of **{ckpt['bytes'] / mib:,.0f} MiB** in {ckpt['shards']}
shards (largest shard {ckpt['largest_shard'] / mib:,.0f} MiB, largest tensor {ckpt['largest_tensor'] / mib:,.0f} MiB),
each conversion in its own process, peak resident memory (VmHWM):

| conversion | peak RSS | × checkpoint |
|---|---|---|
| `bigmodel import` (header first, then one tensor at a time) | {streamed:,.0f} MiB | {streamed * mib / ckpt['bytes']:.2f} |
| load every shard, `save_file` once (the obvious way) | {naive:,.0f} MiB | {naive * mib / ckpt['bytes']:.2f} |
| the runtime alone (CLI, torch, safetensors imported; nothing converted) | {runtime:,.0f} MiB | — |

Ratio naive / import: **{naive / streamed:.1f}×**. Above the runtime, the import holds
{streamed - runtime:,.0f} MiB: the source pages mapped while a shard is read (the largest shard is
{ckpt['largest_shard'] / mib:,.0f} MiB) and one tensor; the obvious way holds the whole model
({naive - runtime:,.0f} MiB above the same runtime).
Machine: {machine_line(info)}."""
    write_section("import_memory", md, {"machine": info, "checkpoint": ckpt, "peak_rss_mib": {"import": streamed, "naive": naive, "runtime": runtime}})
    print(md)


if __name__ == "__main__":
    main()

"""Training throughput: `bigmodel train`'s loop against a minimal hand-written PyTorch loop, and
bf16-mixed against fp32, side by side in one run.

Both loops train the same `milli` GPT (~2.8M parameters) on the same byte windows of text:stdlib,
batch 16 × 128 tokens, AdamW, gradient clipping at 1.0, fixed threads. Rounds alternate A B A B …;
each round is a fresh run of STEPS steps and its throughput is measured from step 3 on (warm-up
excluded), so run-directory setup and the final artifact write are not counted. The claim is the
ratio of medians.

    python benchmarks/train_overhead.py [--rounds 5] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _common import machine, machine_line, write_section

PRESET, BATCH, BLOCK = "milli", 16, 128


def bigmodel_round(steps: int, precision: str, workdir: str, seed: int) -> float:
    from bigmodel_cli import TrainConfig
    from bigmodel_cli.engine.training.loop import run_job
    from bigmodel_cli.engine.training.job import prepare_training

    stamps: list[float] = []

    def progress(event, **info):
        if event == "step":
            stamps.append(time.perf_counter())

    cfg = TrainConfig(model="gpt", preset=PRESET, data="text:stdlib", batch_size=BATCH, block_size=BLOCK,
                      max_steps=steps, eval_every=10_000, checkpoint_every=10_000, eval_windows=1,
                      precision=precision, seed=seed, out=f"{workdir}/bm-{precision}-{seed}", overwrite=True)
    run_job(prepare_training(cfg), progress)
    return (len(stamps) - 3) * BATCH * BLOCK / (stamps[-1] - stamps[2])


def plain_round(steps: int, workdir: str, seed: int) -> float:
    """What a user would write by hand: same model, data and optimizer; nothing else."""
    import torch
    from torch.nn import functional as F

    from bigmodel_cli.data import load_dataset, parse_data_arg
    from bigmodel_cli.models import build_model, resolve_spec

    data = load_dataset(parse_data_arg("text:stdlib"))
    torch.manual_seed(seed)
    model = build_model(resolve_spec("gpt", PRESET, None, {"vocab_size": 256}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    stamps = []
    model.train()
    for _ in range(steps):
        x, y = data.windows(data.window_starts("train", BATCH, BLOCK, gen), BLOCK)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        stamps.append(time.perf_counter())
    return (len(stamps) - 3) * BATCH * BLOCK / (stamps[-1] - stamps[2])


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates: dict[str, list[float]] = {"plain": [], "bigmodel fp32": [], "bigmodel bf16-mixed": []}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            order = list(rates) if r % 2 == 0 else list(rates)[::-1]
            for name in order:
                if name == "plain":
                    rates[name].append(plain_round(args.steps, workdir, r))
                else:
                    rates[name].append(bigmodel_round(args.steps, name.split()[1], workdir, r))
                print(f"round {r} {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    overhead = med["bigmodel fp32"] / med["plain"]
    bf16 = med["bigmodel bf16-mixed"] / med["bigmodel fp32"]
    from bigmodel_cli.engine.core.hardware import cpu_has_native_bf16

    info = machine()
    md = f"""## Training throughput (`benchmarks/train_overhead.py`)

gpt `{PRESET}` (~2.8M parameters), text:stdlib, batch {BATCH} × {BLOCK} tokens, AdamW, clip 1.0,
{args.threads} threads; {args.rounds} interleaved rounds of {args.steps} steps, throughput from step 3 on.
Machine: {machine_line(info)}. Native bf16 on this CPU: {"yes" if cpu_has_native_bf16() else "no"}.

| loop | median tokens/s (this machine) | ratio |
|---|---|---|
| minimal hand-written PyTorch loop | {med['plain']:,.0f} | 1.00 |
| `bigmodel train`, fp32 | {med['bigmodel fp32']:,.0f} | **{overhead:.3f}** (target ≥ 0.95) |
| `bigmodel train`, bf16-mixed | {med['bigmodel bf16-mixed']:,.0f} | **{bf16:.2f}× fp32** (target ≥ 1.8× on a CPU with native bf16) |

`--precision auto` chooses bf16-mixed only where the hardware computes bf16 natively (CUDA, or a CPU
with AVX-512 BF16/AMX) and the model has at least 1M parameters; on this machine it chooses
{"bf16-mixed" if cpu_has_native_bf16() else "fp32, because the CPU has no native bf16 and autocast would emulate it"}.
"""
    write_section("train_overhead", md, {"machine": info, "rates": rates, "ratio_overhead": overhead, "ratio_bf16": bf16})
    print(md)


if __name__ == "__main__":
    main()

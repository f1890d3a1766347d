"""The plan every pruning method follows: how much to prune at each step, how wide a pruned layer
stays, what an N:M pattern means, and which layers ``--ignore`` keeps. Pure functions, no torch."""

from __future__ import annotations

import fnmatch
import math

from bigmodel_cli.errors import UserError


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Target sparsity after each of ``steps`` increments (Zhu & Gupta 2017, "To prune, or not to
    prune"): s_k = s_f + (s_i - s_f)(1 - k/K)^3. Pruning fast early, while the network still has
    redundancy, and slowly at the end, when every weight matters, is what makes high sparsity
    recoverable. Index 0 is the starting point (``initial``); the list has ``steps + 1`` entries."""
    return [final + (initial - final) * (1.0 - k / steps) ** 3 for k in range(steps + 1)]


def torch_pruning_scheduler(ratio: float, steps: int) -> list[float]:
    """The same cubic schedule in the shape Torch-Pruning's ``iterative_pruning_ratio_scheduler`` takes."""
    return cubic_schedule(ratio, steps)


def kept_width(width: int, sparsity: float, round_to: int = 1) -> int:
    """How many of ``width`` units survive pruning a fraction ``sparsity`` of them.

    At most that fraction is removed (the count is floored), the survivors are rounded down to a
    multiple of ``round_to`` (hardware-friendly widths, the same rule as Torch-Pruning's), and a
    layer never goes below one unit, or below ``round_to`` when it was at least that wide.
    """
    removed = math.floor(width * sparsity + 1e-9)
    keep = max(1, width - removed)
    if round_to > 1 and width >= round_to:
        keep = max(round_to, keep - keep % round_to)
    return min(keep, width)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' → (2, 4): keep N of every M consecutive weights."""
    parts = pattern.replace(" ", "").split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--pattern {pattern!r}: write it as N:M, e.g. 2:4 (keep 2 of every 4 weights)") from None
    if not 0 < n < m:
        raise UserError(f"--pattern {pattern!r}: N:M keeps N of every M weights, so 0 < N < M is needed (e.g. 2:4)")
    if m > 64:
        raise UserError(f"--pattern {pattern!r}: M above 64 is not N:M sparsity; use --sparsity instead")
    return n, m


def split_ignored(names: list[str], patterns: list[str], what: str = "layer") -> tuple[list[str], list[str]]:
    """(pruned, kept) names. Every ``--ignore`` pattern must match something: a pattern that matches
    nothing is almost always a typo, and silently pruning the layer it meant to keep is worse."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UserError(f"--ignore {pattern!r} matches no prunable {what}; the {what}s are: {shown}")
    kept = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return [n for n in names if n not in kept], kept


# What benchmarks/prune.py and benchmarks/defaults.py learned on the digits MLP at 90 %
# (docs/prune.md, "Defaults"): one-shot pruning with 5 fine-tuning epochs lost 16 points; 4 cubic
# steps at 3× the original learning rate lost up to 2.8 points with 5 epochs a step, up to 1.7
# with 10 (on another training seed), and at most 0.6 with 15; 20 leaves a margin.
HIGH_SPARSITY = 0.8  # from here on, one-shot pruning loses more than fine-tuning wins back
MIN_EPOCHS_PER_STEP = 20
FINETUNE_LR_FACTOR = 3.0
MAX_FINETUNE_LR = 1e-2
FALLBACK_LR = 1e-3  # the trainer's default, for a parent whose manifest does not say its rate


def gradual_steps(sparsity: float) -> int:
    """How many cubic steps a target sparsity gets by default: more as fewer weights survive."""
    if sparsity < HIGH_SPARSITY:
        return 1
    if sparsity < 0.9:
        return 3
    if sparsity < 0.95:
        return 4
    return 6


def finetune_plan(sparsity: float, finetune_epochs: int, original_lr: float | None,
                  steps: int | None = None, lr: float | None = None) -> dict:
    """The pruning schedule and fine-tuning rate when --finetune-epochs E is given: pure, so the
    docs (docs/prune.md, "Defaults") and a test can check it. ``steps``/``lr``: the user's own
    --steps/--lr, which always win. Returns steps, epochs_per_step, lr and a line saying why."""
    base = original_lr if original_lr else FALLBACK_LR
    source = "the original run's" if original_lr else "the trainer's default"
    why = []
    chosen_steps = steps if steps is not None else gradual_steps(sparsity)
    gradual = steps is None and chosen_steps > 1
    epochs = finetune_epochs
    if steps is not None:
        why.append(f"{steps} step(s) as --steps says")
    elif gradual:
        epochs = max(finetune_epochs, MIN_EPOCHS_PER_STEP)
        why.append(f"sparsity {sparsity:g} ≥ {HIGH_SPARSITY:g}: {chosen_steps} cubic steps of {epochs} epochs "
                   f"(at least {MIN_EPOCHS_PER_STEP} a step; one shot loses accuracy fine-tuning cannot win back)")
    else:
        why.append(f"sparsity {sparsity:g} < {HIGH_SPARSITY:g}: one step of {epochs} epochs")
    if lr is not None:
        chosen_lr = lr
        why.append(f"lr {lr:g} as --lr says")
    elif gradual:
        chosen_lr = min(base * FINETUNE_LR_FACTOR, MAX_FINETUNE_LR)
        why.append(f"lr {chosen_lr:g} = {FINETUNE_LR_FACTOR:g}× {source} {base:g} (each step's cosine decay "
                   "needs a higher start to recover)")
    else:
        chosen_lr = base
        why.append(f"lr {chosen_lr:g}: {source}")
    return {"steps": chosen_steps, "epochs_per_step": epochs, "lr": chosen_lr, "gradual": gradual,
            "why": "; ".join(why)}


def original_lr(options: dict | None) -> float | None:
    """The learning rate an artifact was trained with, from its manifest's options (a train run's
    own, or a prune run's fine-tuning); None when the manifest does not say."""
    options = options if isinstance(options, dict) else {}
    for candidate in (options, options.get("finetune"), options.get("train")):
        if isinstance(candidate, dict):
            value = candidate.get("lr")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
                return float(value)
    return None

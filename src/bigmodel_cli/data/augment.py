"""Data augmentation: named policies with checked strengths, applied on the fly to a training batch.

``--augment shift=1,rotate=10,noise=0.05`` (or ``augment = "..."`` in a TOML file or recipe) names
policies and their strengths; ``--augment default`` takes the default set for the kind of data.
The policies are data (``POLICIES``): a name, the kinds of data it is defined for, its range and
its default, so parsing, checking, the error messages and docs/data.md all read the same table.

An augmented batch is a pure function of (seed, step, position in the global batch): the random
draws come from a generator seeded with those numbers, and the whole global batch is augmented
before data-parallel ranks take their slices. Resume therefore stays bit-exact, and N processes
see exactly the batch one process sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

IMAGE, TABULAR = "image", "tabular"


@dataclass(frozen=True)
class Policy:
    name: str
    kinds: tuple[str, ...]  # the kinds of data it is defined for
    low: float  # smallest strength allowed
    high: float | None  # largest allowed (None: the image decides, see image_limit)
    default: float  # the strength a bare name (``--augment shift``) gets
    integer: bool
    help: str


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("shift", (IMAGE,), 0, None, 1, True, "random translation by up to N pixels each way"),
    Policy("rotate", (IMAGE,), 0, 180, 10, False, "random rotation by up to D degrees"),
    Policy("scale", (IMAGE,), 0, 0.5, 0.1, False, "random zoom by a factor in [1-S, 1+S]"),
    Policy("cutout", (IMAGE,), 0, None, 3, True, "blank one random N×N square"),
    Policy("flip", (IMAGE,), 0, 1, 0.5, False, "mirror left-right with probability P (only when asked: "
                                              "digits and text are not symmetric)"),
    Policy("noise", (IMAGE, TABULAR), 0, 5, 0.05, False, "add Gaussian noise of standard deviation SIGMA "
                                                          "(in standardized units)"),
    Policy("mixup", (TABULAR, IMAGE), 0, 10, 0.2, False, "mix pairs of samples and their labels by "
                                                         "λ ~ Beta(ALPHA, ALPHA)"),
)}

# What ``--augment default`` means for each kind of data: measured in docs/data.md.
DEFAULTS: dict[str, dict[str, float]] = {
    IMAGE: {"shift": 1, "rotate": 10, "scale": 0.1},
    TABULAR: {"noise": 0.1, "mixup": 0.2},
}

# Mixes labels, so it needs a loss that takes soft targets (the trainer's own classification loss).
LABEL_MIXING = ("mixup",)

# Salt of the augmentation's random stream, so it never repeats the batch sampler's stream.
_SALT = 0xA06


def _names() -> str:
    return ", ".join(POLICIES)


def parse_augment(text: str | None) -> dict[str, float]:
    """``'shift=1,rotate=10'`` → {'shift': 1, 'rotate': 10.0}; 'default' → {} (resolved per kind of
    data by ``policy_for``); checks names and the ranges that do not depend on the data."""
    if text is None:
        return {}
    text = text.strip()
    if text in ("default", "on"):
        return {"default": 1.0}
    if text in ("", "none", "off"):
        return {}
    chosen: dict[str, float] = {}
    for part in text.split(","):
        name, has_value, raw = (s.strip() for s in part.partition("="))
        if name == "default" and not has_value:
            chosen["default"] = 1.0
            continue
        policy = POLICIES.get(name)
        if policy is None:
            raise UserError(f"--augment: unknown policy {name!r}; the policies are {_names()} "
                            "(or 'default'), written like shift=1,rotate=10,noise=0.05")
        if name in chosen:
            raise UserError(f"--augment: {name} is given twice; give each policy once")
        chosen[name] = _strength(policy, raw) if has_value else float(policy.default)
    return chosen


def _strength(policy: Policy, raw: str) -> float:
    """One policy's strength, checked against the range that holds for every data set."""
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or (policy.integer and value != int(value)):
        kind = "a whole number of pixels" if policy.integer else "a number"
        raise UserError(f"--augment {policy.name}={raw}: the strength must be {kind} ({policy.help})")
    top = f" and {policy.high:g}" if policy.high is not None else ""
    if value < policy.low or (policy.high is not None and value > policy.high):
        raise UserError(f"--augment {policy.name}={raw}: out of range; give a value between {policy.low:g}{top} "
                        f"({policy.help})")
    return value


def data_kind(task: str, input_shape) -> str:
    """image (C×H×W or H×W) or tabular (a vector of features); text has no policies."""
    if task == "language-modeling":
        raise UserError("--augment is not defined for language models (text data); drop --augment. Policies "
                        f"exist for images and tabular data: {_names()}")
    return IMAGE if len(input_shape) in (2, 3) else TABULAR


def policy_for(chosen: dict[str, float], task: str, input_shape, *, mixing_allowed: bool = True) -> dict[str, float]:
    """The policies to apply to this data ({}: none), checked against its kind and image size."""
    if not chosen:
        return {}
    kind = data_kind(task, input_shape)
    if "default" in chosen:
        chosen = {**DEFAULTS[kind], **{k: v for k, v in chosen.items() if k != "default"}}
    for name in chosen:
        if kind not in POLICIES[name].kinds:
            valid = ", ".join(n for n, p in POLICIES.items() if kind in p.kinds)
            raise UserError(f"--augment {name} is not defined for {kind} data (shape "
                            f"{'×'.join(map(str, input_shape))}); for this data choose from {valid}")
    if kind == IMAGE:
        side = min(input_shape[-2:])
        for name in ("shift", "cutout"):
            if chosen.get(name, 0) >= side:
                raise UserError(f"--augment {name}={chosen[name]:g} is not smaller than the image "
                                f"({input_shape[-2]}×{input_shape[-1]} pixels); give at most {side - 1}")
    if not mixing_allowed:
        mixed = [n for n in LABEL_MIXING if chosen.get(n)]
        if mixed:
            raise UserError(f"--augment {mixed[0]} mixes labels, which this command's loss does not take; "
                            f"drop {mixed[0]} (the other policies work: "
                            f"{', '.join(n for n in POLICIES if n not in LABEL_MIXING)})")
    return {k: v for k, v in chosen.items() if v}


def generator(seed: int, micro_step: int):
    """The random stream of one global micro-batch's augmentation."""
    import torch

    value = 0
    for s in (seed, micro_step, _SALT):
        value = (value * 1_000_003 + int(s)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def augment_batch(x, y, policy: dict[str, float], seed: int, micro_step: int, num_classes: int):
    """The augmented global micro-batch: row i's draws depend only on (seed, micro_step, i).

    Returns (x, y); with mixup, y becomes soft targets of shape (batch, num_classes)."""
    import torch

    if not policy or len(y) == 0:
        return x, y
    gen = generator(seed, micro_step)
    n = len(y)
    # Every draw is made for every policy, used or not, in a fixed order: the stream a policy sees
    # does not change when another one is switched on or off.
    draws = {name: torch.rand((n, 4), generator=gen) for name in POLICIES}
    x = x.clone()
    if len(x.shape) >= 3:
        x = _geometric(x, policy, draws)
    if policy.get("noise"):  # drawn last: the other policies' numbers do not depend on it
        x = x + policy["noise"] * torch.randn(x.shape, generator=gen).to(x.dtype)
    if policy.get("mixup"):
        x, y = _mixup(x, y, policy["mixup"], draws["mixup"], num_classes)
    return x, y


def _geometric(x, policy: dict[str, float], draws: dict):
    """Flip, rotation, scale and shift as one affine resampling (border padding keeps the
    background), then cutout."""
    import torch
    from torch.nn import functional as F

    images = x if x.dim() == 4 else x.unsqueeze(1)
    n, _c, h, w = images.shape
    if any(policy.get(k) for k in ("shift", "rotate", "scale", "flip")):
        angle = (draws["rotate"][:, 0] * 2 - 1) * math.radians(policy.get("rotate", 0))
        zoom = 1 + (draws["scale"][:, 0] * 2 - 1) * policy.get("scale", 0)
        shift = int(policy.get("shift", 0))
        # Whole-pixel shifts: integers in [-shift, shift], in grid units (2 / size per pixel).
        dx = torch.floor(draws["shift"][:, 0] * (2 * shift + 1)) - shift
        dy = torch.floor(draws["shift"][:, 1] * (2 * shift + 1)) - shift
        mirror = torch.where(draws["flip"][:, 0] < policy.get("flip", 0), -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * mirror, -sin, -dx * 2 / w], 1),
                             torch.stack([sin * mirror, cos, -dy * 2 / h], 1)], 1).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    side = int(policy.get("cutout", 0))
    if side:
        top = torch.floor(draws["cutout"][:, 0] * (h - side + 1)).long()
        left = torch.floor(draws["cutout"][:, 1] * (w - side + 1)).long()
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        hole = ((rows >= top.view(n, 1, 1)) & (rows < (top + side).view(n, 1, 1))
                & (cols >= left.view(n, 1, 1)) & (cols < (left + side).view(n, 1, 1)))
        images = images.masked_fill(hole.unsqueeze(1), 0.0)  # 0 is the mean in standardized units
    return images if x.dim() == 4 else images.squeeze(1)


def _mixup(x, y, alpha: float, draws, num_classes: int):
    """Each row mixed with the row its draw picks, λ ~ Beta(alpha, alpha) by inverse transform of
    the row's own uniform draws (so row i depends on row i's draws only)."""
    import torch
    from torch.nn import functional as F

    n = len(y)
    # torch's Beta sampler takes no generator, so Jöhnk's method from the row's own uniforms:
    # with U' = U^(1/a), V' = V^(1/a) and U' + V' <= 1, U'/(U'+V') ~ Beta(a, a). The rare rejected
    # row (a one-shot draw cannot retry) takes λ = 0.5 instead.
    u1, u2 = draws[:, 0].clamp_min(1e-12) ** (1 / alpha), draws[:, 1].clamp_min(1e-12) ** (1 / alpha)
    lam = torch.where(u1 + u2 <= 1, u1 / (u1 + u2).clamp_min(1e-12), torch.full_like(u1, 0.5))
    lam = torch.maximum(lam, 1 - lam)  # the row keeps the larger share: it stays mostly itself
    partner = torch.floor(draws[:, 2] * n).long().clamp_max(n - 1)
    shape = (n,) + (1,) * (x.dim() - 1)
    mixed_x = lam.view(shape).to(x.dtype) * x + (1 - lam.view(shape)).to(x.dtype) * x[partner]
    soft = y if y.dtype.is_floating_point else F.one_hot(y, num_classes).float()
    mixed_y = lam.view(n, 1) * soft + (1 - lam.view(n, 1)) * soft[partner]
    return mixed_x, mixed_y


def policy_from_option(text: str | None, data, *, mixing_allowed: bool = True) -> dict[str, float]:
    """--augment's value checked against a loaded data set ({}: no augmentation)."""
    chosen = parse_augment(text)
    if not chosen:
        return {}
    if data.task == "language-modeling":
        data_kind(data.task, ())  # raises: text has no policies
    return policy_for(chosen, data.task, data.input_shape, mixing_allowed=mixing_allowed)

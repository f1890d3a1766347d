"""The losses of knowledge distillation: plain functions of tensors, the hidden-state matching
(forward hooks and learned projections) and ``DistillLoss``, the trainer's ``loss_fn`` combining them.

Logit distillation follows Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
Network": soften both distributions with a temperature T and match them; the T² factor keeps the
gradient of the soft term on the same scale as the hard-label term when T changes. Every loss here
is computed per position (a sample for classifiers, a token for language models), averaged over the
positions whose label is not ``IGNORE_INDEX``, and in float32 whatever the autocast precision.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from bigmodel_cli.errors import UserError

HIDDEN_ARCHS = ("mlp", "cnn", "gpt", "llama")  # the built-in models whose layers the hooks know
# --cache-teacher keeps the teacher's outputs for the whole training split in memory; refuse when
# that would take more than this share of the machine's RAM.
CACHE_MEMORY_SHARE = 0.25
KD_LOSSES = ("forward-kl", "reverse-kl", "mse")
HIDDEN_LOSSES = ("mse", "cosine")
IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips; masked here the same way


def _masked_mean(per_position, targets):
    """Mean of a (…,) tensor over positions whose label is not IGNORE_INDEX (0 if there are none)."""
    if targets is None:
        return per_position.mean()
    mask = (targets != IGNORE_INDEX).to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def kd_loss(student_logits, teacher_logits, targets=None, temperature: float = 2.0, kind: str = "forward-kl"):
    """The soft-target term alone: T²·KL(teacher ‖ student) by default.

    ``forward-kl`` (Hinton's) makes the student cover every class the teacher gives mass to;
    ``reverse-kl`` is mode-seeking: the student may drop the teacher's low-probability tail, which
    can suit a much smaller student. ``mse`` matches raw logits (Ba & Caruana 2014); the temperature
    cancels there (T²·MSE(s/T, t/T) = MSE(s, t)), so it is ignored.
    """
    import torch.nn.functional as F

    s = student_logits.float()
    t = teacher_logits.float()
    if kind == "mse":
        per_position = (s - t).pow(2).mean(dim=-1)
        return _masked_mean(per_position, targets)
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    if kind == "forward-kl":
        per_position = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    elif kind == "reverse-kl":
        per_position = (log_s.exp() * (log_s - log_t)).sum(dim=-1)
    else:
        raise ValueError(f"unknown kd loss {kind!r}")
    return temperature**2 * _masked_mean(per_position, targets)


def hard_loss(student_logits, targets):
    """Cross-entropy with the true labels, skipping IGNORE_INDEX positions."""
    import torch.nn.functional as F

    logits = student_logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def distillation_loss(student_logits, teacher_logits, targets, temperature: float = 2.0, alpha: float = 0.5,
                      kind: str = "forward-kl"):
    """alpha · soft term + (1 − alpha) · CE(labels); either term is skipped when its weight is 0."""
    total = 0.0
    if alpha > 0:
        total = alpha * kd_loss(student_logits, teacher_logits, targets, temperature, kind)
    if alpha < 1:
        total = total + (1.0 - alpha) * hard_loss(student_logits, targets)
    return total


def hidden_loss(student_hidden, teacher_hidden, kind: str = "mse", targets=None):
    """Distance between (already projected) student and teacher features, channel-last (…, width).

    ``mse`` matches magnitudes too; ``cosine`` (1 − cosine similarity) only directions, which is
    gentler when the teacher's residual stream is much larger than the student's.
    """
    import torch.nn.functional as F

    s = student_hidden.float()
    t = teacher_hidden.float()
    if kind == "mse":
        per_position = (s - t).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_position = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
    else:
        raise ValueError(f"unknown hidden loss {kind!r}")
    # Per-token hidden states of a language model are masked like its labels; image feature maps
    # (batch, h, w, c) have no per-pixel labels and are averaged whole.
    if targets is not None and per_position.shape == targets.shape:
        return _masked_mean(per_position, targets)
    return per_position.mean()


# --------------------------------------------------------------------------- hidden states


def hidden_layers(model, arch: str) -> list:
    """The modules whose outputs count as the model's hidden states, in order.

    mlp: each hidden layer's activation; cnn: each conv stage's output (after pooling); gpt and
    llama: each transformer block's output (the residual stream).
    """
    from torch import nn

    if arch == "mlp":
        return [m for m in model.net if isinstance(m, nn.ReLU)]
    if arch == "cnn":
        stages, current = [], None
        for module in model.features:
            if isinstance(module, nn.Conv2d) and current is not None:
                stages.append(current)
            current = module
        if current is not None:
            stages.append(current)
        return stages
    if arch in ("gpt", "llama"):
        return list(model.blocks)
    raise UserError(
        f"hidden-state distillation reads the layers of the built-in models ({', '.join(HIDDEN_ARCHS)}); "
        f"this model is {arch!r}: drop --hidden-loss to distil its logits only"
    )


class HiddenTap:
    """Forward hooks that keep the outputs of chosen layers while ``active`` (channel-last)."""

    def __init__(self, modules: list, indices: list[int], channels_first: bool):
        self.outputs: dict[int, Any] = {}
        self.active = False
        self.channels_first = channels_first
        self.handles = [modules[i].register_forward_hook(self._hook(i)) for i in sorted(set(indices))]

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            if self.active:
                # (B, C, H, W) → (B, H, W, C): every feature then has its width last, so one
                # nn.Linear projects mlp, cnn and gpt features alike.
                self.outputs[index] = output.permute(0, 2, 3, 1) if self.channels_first else output

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Spread the student's layers over the teacher's, last to last (2 over 4 → 0:1, 1:3); a
    student deeper than its teacher maps several layers to one."""
    return [(i, -(-(i + 1) * teacher_layers // student_layers) - 1) for i in range(student_layers)]


def _pool_to_common(s, t):
    """Feature maps of different spatial sizes (cnn stages) are average-pooled to the smaller one."""
    import torch.nn.functional as F

    if s.dim() != 4 or s.shape[1:3] == t.shape[1:3]:
        return s, t
    size = (min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2]))

    def pool(x):
        return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)

    return pool(s), pool(t)


@dataclass
class HiddenMatch:
    """Which student layers imitate which teacher layers, how, and the learned projections."""

    kind: str
    weight: float
    pairs: list[tuple[int, int]]
    student_tap: HiddenTap
    teacher_tap: HiddenTap
    projections: Any  # nn.ModuleDict "s{i}_t{j}" → Linear(student width, teacher width), or None
    widths: dict

    def loss(self, teacher_hidden: dict, targets):
        total = 0.0
        for s_index, t_index in self.pairs:
            s = self.student_tap.outputs[s_index]
            key = f"s{s_index}_t{t_index}"
            if self.projections is not None and key in self.projections:
                s = self.projections[key](s)
            s, t = _pool_to_common(s, teacher_hidden[t_index])
            total = total + hidden_loss(s, t, self.kind, targets)
        return self.weight * total / len(self.pairs)

    def close(self) -> None:
        self.student_tap.close()
        self.teacher_tap.close()


def build_hidden_match(teacher, student, teacher_arch: str, student_arch: str, example, kind: str, weight: float,
                       layer_map: list[tuple[int, int]] | None) -> HiddenMatch:
    """Hook both models, check the layer map against their layers, size the projections."""
    import torch
    from torch import nn

    t_layers, s_layers = hidden_layers(teacher, teacher_arch), hidden_layers(student, student_arch)
    if not t_layers or not s_layers:
        who = "teacher" if not t_layers else "student"
        raise UserError(f"the {who} has no hidden layers to match; drop --hidden-loss")
    pairs = layer_map or default_layer_map(len(s_layers), len(t_layers))
    for s_index, t_index in pairs:
        if s_index >= len(s_layers):
            raise UserError(f"--layer-map: the student has no hidden layer {s_index} (it has {len(s_layers)}: 0–{len(s_layers) - 1})")
        if t_index >= len(t_layers):
            raise UserError(f"--layer-map: the teacher has no hidden layer {t_index} (it has {len(t_layers)}: 0–{len(t_layers) - 1})")
    s_tap = HiddenTap(s_layers, [s for s, _ in pairs], student_arch == "cnn")
    t_tap = HiddenTap(t_layers, [t for _, t in pairs], teacher_arch == "cnn")
    s_tap.active = t_tap.active = True
    try:
        with torch.no_grad():
            teacher(example)
            student(example)
    finally:
        s_tap.active = t_tap.active = False
    projections, widths = nn.ModuleDict(), {}
    for s_index, t_index in pairs:
        s_out, t_out = s_tap.outputs[s_index], t_tap.outputs[t_index]
        if s_out.dim() != t_out.dim():
            raise UserError(f"--layer-map {s_index}:{t_index}: the student's features {tuple(s_out.shape)} and the "
                            f"teacher's {tuple(t_out.shape)} have different shapes; map layers of the same kind")
        ws, wt = s_out.shape[-1], t_out.shape[-1]
        widths[f"{s_index}:{t_index}"] = [int(ws), int(wt)]
        if ws != wt:  # FitNets-style regressor from the student's width to the teacher's
            projections[f"s{s_index}_t{t_index}"] = nn.Linear(ws, wt)
    s_tap.outputs.clear()
    t_tap.outputs.clear()
    return HiddenMatch(kind, weight, pairs, s_tap, t_tap, projections if len(projections) else None, widths)


# --------------------------------------------------------------------------- the loss


class DistillLoss:
    """The trainer's ``loss_fn(model, x, y)``: the teacher runs in eval mode under no_grad, then
    alpha·T²·KD + (1 − alpha)·CE, plus the weighted hidden-state term when there is one.

    With a cache (``--cache-teacher``) ``y`` holds row numbers of the training split, and the
    teacher's outputs and the labels are looked up instead of computed.
    """

    def __init__(self, teacher, *, temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward-kl",
                 hidden: HiddenMatch | None = None):
        self.teacher = teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        self.temperature, self.alpha, self.kind = temperature, alpha, kind
        self.hidden = hidden
        self.cache: dict | None = None

    @property
    def projections(self):
        return self.hidden.projections if self.hidden is not None else None

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.hidden is not None

    def _teacher_outputs(self, x):
        import torch

        first = next(self.teacher.parameters(), None)
        if first is not None and first.device != x.device:  # run_job moves the student only
            self.teacher.to(x.device)
        self.teacher.eval()
        tap = self.hidden.teacher_tap if self.hidden else None
        if tap:
            tap.active = True
        try:
            with torch.no_grad():
                logits = self.teacher(x)
            hidden = dict(tap.outputs) if tap else {}
        finally:
            if tap:
                tap.active = False
                tap.outputs.clear()
        return logits, hidden

    def __call__(self, model, x, y):
        if self.cache is not None:
            rows = y.cpu()
            y = self.cache["labels"][rows].to(x.device)
            t_logits = self.cache["logits"][rows].to(x.device)
            t_hidden = {k: v[rows].to(x.device) for k, v in self.cache["hidden"].items()}
        elif self.needs_teacher:
            t_logits, t_hidden = self._teacher_outputs(x)
        else:
            t_logits, t_hidden = None, {}
        tap = self.hidden.student_tap if self.hidden else None
        if tap:
            tap.active = True
        try:
            s_logits = model(x)
            loss = distillation_loss(s_logits, t_logits, y, self.temperature, self.alpha, self.kind)
            if self.hidden is not None:
                loss = loss + self.hidden.loss(t_hidden, y)
        finally:
            if tap:
                tap.active = False
                tap.outputs.clear()
        return loss

    def check_cacheable(self, task) -> int:
        """The bytes a cache of the teacher's outputs would take; UserError where one cannot be kept."""
        if task.name != "classification":
            raise UserError(
                "--cache-teacher needs a classification dataset: language-model windows start at random "
                "positions, so each teacher output is used once; drop --cache-teacher"
            )
        need = self._output_bytes_per_row(task.x_train[:2]) * len(task.x_train)
        limit = _physical_memory() * CACHE_MEMORY_SHARE
        if need > limit:
            raise UserError(
                f"--cache-teacher would keep {need / 2**30:.1f} GiB of teacher outputs in memory (limit "
                f"{limit / 2**30:.1f} GiB, a quarter of RAM); drop --cache-teacher"
            )
        return need

    def fill_cache(self, task, batch_size: int = 512) -> dict:
        """Run the teacher once over the training split (classification only) and keep its outputs."""
        import torch

        need = self.check_cacheable(task)
        x = task.x_train
        logits, hidden = [], {}
        for start in range(0, len(x), batch_size):
            out, feats = self._teacher_outputs(x[start:start + batch_size])
            logits.append(out.float().cpu())
            for k, v in feats.items():
                hidden.setdefault(k, []).append(v.float().cpu())
        self.cache = {"labels": task.y_train.clone(), "logits": torch.cat(logits),
                      "hidden": {k: torch.cat(v) for k, v in hidden.items()}}
        return {"rows": len(x), "bytes": need}

    def _output_bytes_per_row(self, sample) -> int:
        out, feats = self._teacher_outputs(sample)
        return 4 * (out[0].numel() + sum(v[0].numel() for v in feats.values()))

    def close(self) -> None:
        if self.hidden is not None:
            self.hidden.close()


class RowsTask:
    """A classification task whose batches carry each row's number in the training split instead
    of its label, so ``DistillLoss`` can look up the cached teacher outputs. The rows come from the
    task's own sampler, so the batches are exactly those of an uncached run."""

    def __init__(self, task):
        import torch

        self._task = task
        self._rows = copy.copy(task)
        self._rows.y_train = torch.arange(len(task.y_train))

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def batch(self, micro_step: int, rank: int = 0, world: int = 1):
        return self._rows.batch(micro_step, rank, world)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30

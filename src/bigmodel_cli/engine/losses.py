"""The losses of knowledge distillation, as plain functions of tensors.

Logit distillation follows Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
Network": soften both distributions with a temperature T and match them; the T² factor keeps the
gradient of the soft term on the same scale as the hard-label term when T changes. Every loss here
is computed per position (a sample for classifiers, a token for language models), averaged over the
positions whose label is not ``IGNORE_INDEX``, and in float32 whatever the autocast precision.
"""

from __future__ import annotations

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

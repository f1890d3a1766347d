"""Building the ``bigmodel distill`` student: its model spec from a preset, a config or an existing
artifact (``student_spec_for``), the training window both models share (``shared_block_size``), the check
that it agrees with its teacher on input and output (``check_agreement``), and copying every k-th
teacher layer into it (``init_from_teacher``). Split out of ``command.py``, which re-exports
the public names.
"""

from __future__ import annotations

import math

from bigmodel_cli import artifact as art
from bigmodel_cli.config import TrainConfig
from bigmodel_cli.errors import UserError, first_line
from bigmodel_cli.models import USER_ARCH, get_arch, resolve_spec
from .losses import HIDDEN_ARCHS
from .options import DistillConfig


def check_agreement(teacher, student, task) -> int:
    """Run both models on two real samples: the student must take the teacher's input and give
    one output per class (or vocabulary entry) exactly as the teacher does. Returns that width."""
    import torch

    example = torch.from_numpy(task.example_input(2))
    outputs = {}
    for who, model in (("teacher", teacher), ("student", student)):
        try:
            with torch.no_grad():
                outputs[who] = model(example)
        except Exception as exc:  # a misfit model: say which and why, no traceback
            raise UserError(f"the {who} does not accept this data's input of shape {tuple(example.shape)}: "
                            f"{first_line(exc, with_type=True)}; make the {who}'s input size match the teacher's data") from None
    t_out, s_out = outputs["teacher"], outputs["student"]
    lm = task.name == "language-modeling"
    what, key = ("vocabulary", "vocab_size") if lm else ("classes", "num_classes")
    if s_out.shape[-1] != t_out.shape[-1]:
        raise UserError(
            f"teacher and student must agree on the {what}: the teacher has {t_out.shape[-1]} "
            f"{'tokens' if lm else 'classes'} but the student has {s_out.shape[-1]}; set {key} to {t_out.shape[-1]} "
            "in --student-config (or drop it to inherit the teacher's)"
        )
    if s_out.shape != t_out.shape:
        raise UserError(f"the student returns shape {tuple(s_out.shape)} but the teacher {tuple(t_out.shape)} for the same "
                        "input; a student must return what its teacher returns")
    return int(t_out.shape[-1])


def _layer_pairs(student, teacher, arch: str, stride: int, s_spec: dict, t_spec: dict):
    """(label, student module, teacher module) to copy for --init-from-teacher."""
    from torch import nn

    pairs = []
    if arch == "gpt":
        for key in ("n_head", "head_dim"):
            if s_spec.get(key) != t_spec.get(key):
                raise UserError(f"--init-from-teacher: the student's {key} ({s_spec.get(key)}) differs from the teacher's "
                                f"({t_spec.get(key)}); keep the teacher's widths and change only n_layer")
        pairs += [("tok_emb", student.tok_emb, teacher.tok_emb), ("pos_emb", student.pos_emb, teacher.pos_emb),
                  ("ln_f", student.ln_f, teacher.ln_f)]
        if not student.config.tie_weights:  # a tied head is the embedding, already copied
            pairs.append(("lm_head", student.lm_head, teacher.lm_head))
        pairs += [(f"blocks.{i}", block, teacher.blocks[i * stride]) for i, block in enumerate(student.blocks)]
    elif arch == "llama":
        pairs += _llama_pairs(student, teacher, stride, s_spec, t_spec)
    elif arch == "mlp":
        s_lin = [m for m in student.net if isinstance(m, nn.Linear)]
        t_lin = [m for m in teacher.net if isinstance(m, nn.Linear)]
        pairs += [(f"hidden.{i}", m, t_lin[i * stride]) for i, m in enumerate(s_lin[:-1])]
        pairs.append(("output", s_lin[-1], t_lin[-1]))
    elif arch == "cnn":
        s_conv = [m for m in student.features if isinstance(m, nn.Conv2d)]
        t_conv = [m for m in teacher.features if isinstance(m, nn.Conv2d)]
        pairs += [(f"stage.{i}", m, t_conv[i * stride]) for i, m in enumerate(s_conv)]
        s_head = [m for m in student.head if isinstance(m, nn.Linear)]
        t_head = [m for m in teacher.head if isinstance(m, nn.Linear)]
        if len(s_head) != len(t_head):
            raise UserError("--init-from-teacher: the student's head has a different number of layers from the "
                            "teacher's; keep the teacher's hidden_sizes")
        pairs += [(f"head.{i}", s, t) for i, (s, t) in enumerate(zip(s_head, t_head))]
    return pairs


def _llama_pairs(student, teacher, stride: int, s_spec: dict, t_spec: dict) -> list:
    """A llama's every k-th block, its embedding, final norm and (untied) head. The widths and the
    rotary settings must be the teacher's: a copied block computes what it computed only with the
    same heads, groups and positions."""
    for key in ("n_head", "n_kv_head", "head_dim", "rope_theta", "rope_scaling", "qkv_bias"):
        if s_spec.get(key) != t_spec.get(key):
            raise UserError(f"--init-from-teacher: the student's {key} ({s_spec.get(key)}) differs from the teacher's "
                            f"({t_spec.get(key)}); keep the teacher's widths and change only n_layer")
    pairs = [("tok_emb", student.tok_emb, teacher.tok_emb), ("norm", student.norm, teacher.norm)]
    if not student.config.tie_weights:  # a tied head is the embedding, already copied
        pairs.append(("lm_head", student.lm_head, teacher.lm_head))
    return pairs + [(f"blocks.{i}", block, teacher.blocks[i * stride]) for i, block in enumerate(student.blocks)]


def _depth(model, arch: str) -> int:
    from torch import nn

    if arch in ("gpt", "llama"):
        return len(model.blocks)
    if arch == "mlp":
        return sum(isinstance(m, nn.Linear) for m in model.net) - 1
    return sum(isinstance(m, nn.Conv2d) for m in model.features)


def init_from_teacher(student, teacher, student_spec: dict, teacher_spec: dict) -> dict:
    """Copy every k-th teacher layer into the student (as DistilBERT did), plus the parts outside
    the layer stack (embeddings, final norm, output layer). Returns which teacher layers were used.

    Works when the student is the teacher's architecture with fewer layers of the same widths;
    otherwise a UserError lists the tensors that do not line up.
    """
    import torch

    arch = student_spec.get("arch")
    if arch != teacher_spec.get("arch") or arch not in HIDDEN_ARCHS:
        raise UserError(f"--init-from-teacher needs a student of the teacher's built-in architecture "
                        f"({teacher_spec.get('arch')}); the student is {arch}")
    s_depth, t_depth = _depth(student, arch), _depth(teacher, arch)
    if s_depth < 1 or s_depth > t_depth:
        raise UserError(f"--init-from-teacher: the student has {s_depth} layers and the teacher {t_depth}; "
                        "the student needs between 1 and the teacher's number of layers")
    stride = t_depth // s_depth
    pairs = _layer_pairs(student, teacher, arch, stride, student_spec, teacher_spec)
    problems, copies = [], []
    for label, s_mod, t_mod in pairs:
        t_state = t_mod.state_dict()
        for name, s_tensor in s_mod.state_dict().items():
            t_tensor = t_state.get(name)
            if t_tensor is None:
                problems.append(f"{label}.{name} (not in the teacher)")
                continue
            if label == "pos_emb" and t_tensor.shape[0] >= s_tensor.shape[0]:
                t_tensor = t_tensor[: s_tensor.shape[0]]  # a shorter context keeps the first positions
            if t_tensor.shape != s_tensor.shape:
                problems.append(f"{label}.{name} {tuple(s_tensor.shape)} vs teacher {tuple(t_tensor.shape)}")
                continue
            copies.append((s_tensor, t_tensor))
    if problems:
        raise UserError("--init-from-teacher: the student's layers do not fit the teacher's: " + "; ".join(problems[:4])
                        + "; give the student the teacher's widths and fewer layers")
    with torch.no_grad():
        for s_tensor, t_tensor in copies:
            s_tensor.copy_(t_tensor)
    return {"stride": stride, "teacher_layers": [i * stride for i in range(s_depth)]}


def student_spec_for(cfg: DistillConfig, teacher: art.Artifact, data, width: int):
    """The student's config.json model dict, and the artifact it comes from (--student)."""
    if cfg.student is not None:
        source = art.open_artifact(cfg.student)
        if not source.has_weights:
            raise UserError(f"--student {source.path}: is ONNX-only; give an artifact with model.safetensors")
        if source.task != teacher.task:
            raise UserError(f"--student {source.path}: is a {source.task} model but the teacher does {teacher.task}")
        return dict(source.model_spec), source
    teacher_arch = teacher.model_spec["arch"]
    fit = dict(data.model_fit())
    fit["vocab_size" if teacher.task == "language-modeling" else "num_classes"] = width
    if cfg.student_preset is not None:
        if teacher_arch == USER_ARCH:
            raise UserError("--student-preset picks a preset of the teacher's architecture, but the teacher is a user "
                            "model; use --student-config '{\"arch\": \"mlp\", ...}' or --student ARTIFACT")
        return resolve_spec(teacher_arch, cfg.student_preset, {}, fit), None
    values = dict(cfg.student_config)
    if teacher_arch == USER_ARCH and "arch" not in values:
        raise UserError("--student-config: the teacher is a user model, so name the student's \"arch\" "
                        "(mlp, cnn or gpt), e.g. '{\"arch\": \"mlp\", \"hidden_sizes\": [32]}'")
    arch = values.pop("arch", teacher_arch)
    preset = values.pop("preset", None)
    if arch == USER_ARCH or not isinstance(arch, str):
        raise UserError("--student-config: \"arch\" must be a built-in model (mlp, cnn, gpt); "
                        "train a user model first and give it as --student ARTIFACT")
    if get_arch(arch).task != teacher.task:
        raise UserError(f"--student-config: a {arch} student does {get_arch(arch).task} but the teacher does "
                        f"{teacher.task}; choose an architecture for {teacher.task}")
    if arch == teacher_arch and preset is None:
        # The student is the teacher with the keys given changed ({"n_layer": 2} halves a 4-layer
        # teacher), rather than the architecture's default preset, which may be bigger.
        values = {**_inheritable(teacher.model_spec), **values}
        preset = teacher.model_spec.get("preset")
    return resolve_spec(arch, preset, values, fit), None


def _inheritable(spec: dict) -> dict:
    """A teacher's model arguments that a student inherits: widths derived from others (a gpt's
    head_dim and mlp_hidden at their defaults) are left out, so they follow the student's n_embd."""
    values = {k: v for k, v in spec.items() if k not in ("arch", "preset")}
    if spec.get("arch") == "gpt":
        if values.get("head_dim") == values["n_embd"] // values["n_head"]:
            values.pop("head_dim")
        if values.get("mlp_hidden") == 4 * values["n_embd"]:
            values.pop("mlp_hidden")
    if spec.get("arch") == "llama":
        if values.get("head_dim") == values["n_embd"] // values["n_head"]:
            values.pop("head_dim")
        if values.get("mlp_hidden") == 64 * math.ceil(8 * values["n_embd"] / 3 / 64):  # LlamaConfig's default
            values.pop("mlp_hidden")
    return values


def shared_block_size(cfg: TrainConfig, teacher: art.Artifact, student_spec: dict) -> int | None:
    """Language models: the training window, which both models' context must hold."""
    if teacher.task != "language-modeling":
        return None
    limits = {"teacher": teacher.model_spec.get("block_size"), "student": student_spec.get("block_size")}
    if cfg.block_size:
        for who, limit in limits.items():
            if limit and cfg.block_size > limit:
                raise UserError(f"--block-size {cfg.block_size} is longer than the {who}'s context ({limit}); lower it")
        return cfg.block_size
    candidates = [teacher.data_spec.get("block_size") or 128] + [v for v in limits.values() if v]
    return min(candidates)


# The student's default budget (docs/distill.md, "Defaults"; measured by benchmarks/distill.py):
# a small classifier student learns from soft targets slowly, so it gets more epochs and a higher
# rate than the trainer's defaults (30 epochs at 1e-3 kept 95.4 % of the teacher on digits; 60 at
# 3e-3 kept 98.7 %). Language-model students keep the trainer's defaults, which beat --baseline.
SMALL_DATA_SAMPLES = 20_000  # up to this many training samples, 60 epochs; above, 20
SMALL_STUDENT_PARAMS = 100_000  # up to this many parameters, 3e-3; above, 1e-3


def student_budget(task: str, student_params: int, train_samples: int, epochs: int | None,
                   max_steps: int | None, lr: float | None) -> dict:
    """The student's epochs/steps and learning rate: the user's own where given, else chosen from
    the student's size and the data. Pure, so docs/distill.md and a test can check it. Returns
    epochs (None: steps decide), max_steps, lr and a line saying why."""
    why = []
    if epochs is not None or max_steps is not None:
        why.append("budget as --epochs/--max-steps say")
    elif task == "classification":
        epochs = 60 if train_samples <= SMALL_DATA_SAMPLES else 20
        why.append(f"{epochs} epochs ({train_samples:,} training samples "
                   f"{'≤' if train_samples <= SMALL_DATA_SAMPLES else '>'} {SMALL_DATA_SAMPLES:,})")
    else:
        why.append("the trainer's default steps")
    if lr is not None:
        why.append(f"lr {lr:g} as --lr says")
    elif task == "classification":
        lr = 3e-3 if student_params <= SMALL_STUDENT_PARAMS else 1e-3
        why.append(f"lr {lr:g} (student of {student_params:,} parameters "
                   f"{'≤' if student_params <= SMALL_STUDENT_PARAMS else '>'} {SMALL_STUDENT_PARAMS:,})")
    else:
        lr = 1e-3
        why.append(f"lr {lr:g}, the trainer's default")
    return {"epochs": epochs, "max_steps": max_steps, "lr": lr, "why": "; ".join(why)}

"""What the search is for (``Goal``) and what it may try (``plan_space``): candidate steps built from
the existing commands, each with the options a recipe step would give it and an estimated cost.

A candidate is a chain of steps from the input: a step reads the input or an earlier step's output
(``parent``) and writes ``OUT/candidates/NAME``. Steps that train (prune, distill, QAT) write a
PyTorch artifact; on ONNX Runtime (``--backend onnx``, the default) an export step after each makes
it measurable on the runtime the model is deployed on. On PyTorch (``--backend torch``) the trained
artifact itself is the candidate, and what only ONNX Runtime runs (int8 QDQ/integer graphs,
MatMulNBits, QAT's export) is left out of the space. The plan is ordered cheap first (docs/optimize.md, "Strategy"): quantizing
the input, then pruning with short fine-tuning, then QAT and distillation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ...artifact import Artifact
from ...errors import ConfigErrors, UserError

OBJECTIVES = ("latency", "size", "params")
SPACES = ("full", "quick")
FAMILIES = ("quantize", "prune", "distill", "qat")
BACKENDS = ("onnx", "torch")  # the runtime every candidate is measured on (compare's --backend)
RUNTIME = {"onnx": "ONNX Runtime", "torch": "PyTorch"}
INPUT = "input"  # the name a step's parent has when it reads the user's artifact
BASE = "fp32"  # the input exported to ONNX: the first row of every comparison

# Cost model of --dry-run and of the budget check before each step. Fixed seconds per command
# (process-internal: export with verification, quantize with calibration, setup and measurement),
# plus training FLOPs at a conservative rate for small models on a shared CPU core; the search
# rescales the estimates by what the finished steps actually took.
FIXED_SECONDS = {"export": 3.0, "quantize": 3.0, "prune": 3.0, "distill": 3.0, "qat": 5.0}
MEASURE_SECONDS = 2.0
TRAIN_FLOPS_PER_SECOND = 1.5e9
# What an optimizer step costs besides its FLOPs (batches, the teacher's forward pass, evaluation
# and checkpoints at each epoch), per command: measured on the digits MLPs of the benchmark.
STEP_SECONDS = {"prune": 0.02, "qat": 0.03, "distill": 0.04}
BATCH = 64  # the trainer's default batch size, which the search's training steps keep
# Levels of each branch, mildest first: a branch stops at its first level that breaks the limit.
STRUCTURED_LEVELS = {"full": (0.25, 0.5, 0.75), "quick": (0.5,)}
MAGNITUDE_LEVELS = {"full": (0.5, 0.8, 0.9), "quick": ()}
STUDENT_WIDTHS = {"full": (0.5, 0.25, 0.125, 0.0625), "quick": (0.25,)}
# A deep MLP teacher also gets one-hidden-layer students (a branch of their own): the distillation
# benchmark's student is one (docs/benchmarks.md), and one layer less is a fixed cost less per call.
SHALLOW_WIDTHS = {"full": (0.125, 0.0625), "quick": ()}
# Fine-tuning budgets (classification: epochs; language models: optimizer steps), before halving.
FINETUNE = {"classification": {"full": 2, "quick": 1}, "language-modeling": {"full": 40, "quick": 10}}
DISTILL = {"classification": {"full": 30, "quick": 5}, "language-modeling": {"full": 150, "quick": 20}}
QAT = {"classification": 1, "language-modeling": 20}


@dataclass
class Goal:
    objective: str = "latency"
    max_drop: float | None = None  # classifiers: accuracy points (or percent when relative); LMs: perplexity rise, %
    relative: bool = False
    latency_budget_ms: float | None = None
    size_budget_mb: float | None = None  # megabytes of 10^6 bytes: the file the runtime loads
    time_budget_s: float = 1800.0

    @property
    def has_limit(self) -> bool:
        return self.max_drop is not None

    def limit_text(self, task: str) -> str:
        if self.max_drop is None:
            return "no metric limit"
        if task == "language-modeling":
            return f"perplexity at most {self.max_drop:g}% above the input's"
        unit = "%" if self.relative else (" point" if self.max_drop == 1 else " points")
        return f"accuracy at most {self.max_drop:g}{unit} below the input's"


def parse_max_drop(text: str | None) -> tuple[float | None, bool]:
    """'1.0' → (1.0, False): accuracy points; '3%' → (3.0, True): relative. For a language model
    both mean a perplexity rise in percent."""
    if text is None:
        return None, False
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        value = float(raw.rstrip("%").strip())
    except ValueError:
        raise UserError(f"--max-drop {text!r} is not a number; write e.g. 1.0 (accuracy points) or 3% (relative)") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"--max-drop must be a finite number ≥ 0 (how much worse the model may get), got {text}")
    return value, relative


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|)\s*$")


def parse_duration(text: str) -> float:
    """'30m' → 1800.0; '90s', '1.5h' and a bare number of seconds also work."""
    match = _DURATION.match(text or "")
    if not match:
        raise UserError(f"--time-budget {text!r} is not a duration; write e.g. 30m, 90s or 1h")
    seconds = float(match.group(1)) * {"s": 1, "": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds <= 0:
        raise UserError(f"--time-budget must be positive, got {text!r}")
    return seconds


def check_goal(goal: Goal) -> None:
    """Every problem with the goal at once, before anything is opened."""
    p: list[str] = []
    if goal.objective not in OBJECTIVES:
        p.append(f"--objective {goal.objective!r} is unknown; choose latency, size or params")
    for flag, value in (("--latency-budget-ms", goal.latency_budget_ms), ("--size-budget-mb", goal.size_budget_mb)):
        if value is not None and not (math.isfinite(value) and value > 0):
            p.append(f"{flag} must be a positive number, got {value}")
    if goal.max_drop is None and goal.latency_budget_ms is None and goal.size_budget_mb is None:
        p.append("give a limit or a budget: --max-drop 1.0 (the metric may fall by at most this), "
                 "--latency-budget-ms X or --size-budget-mb Y")
    if p:
        raise ConfigErrors(p, "optimize options")


@dataclass
class Step:
    """One command of one candidate, as a recipe step would run it."""
    name: str
    command: str  # export, quantize, prune or distill
    parent: str  # INPUT or an earlier step's name (for distill: the teacher)
    options: dict  # the command's options under their recipe (command-line) names
    family: str  # export, quantize, prune, distill, qat
    estimate_s: float
    branch: str | None = None  # steps of one branch grow more aggressive; it stops at its first miss
    rung: int = 0  # successive halving: 0 first, each rung doubles the fine-tuning budget
    measure: bool = False  # runs on the search's backend: measured against the base
    estimate_fraction: float = 1.0  # distill: the student's parameters as a fraction of the teacher's

    def record(self) -> dict:
        return {"command": self.command, "parent": self.parent, "options": self.options, "family": self.family,
                "branch": self.branch, "rung": self.rung, "measure": self.measure}


@dataclass
class Plan:
    steps: list[Step]
    notes: list[str] = field(default_factory=list)  # families left out, and why
    task: str = "classification"
    backend: str = "onnx"  # the runtime every candidate is measured on
    params: int = 0
    train_samples: int = 0

    def estimate_s(self) -> float:
        return sum(s.estimate_s for s in self.steps)


def parse_only(text: str | None) -> tuple[str, ...]:
    if not text:
        return FAMILIES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise UserError(f"--only {text!r}: {', '.join(unknown) or 'nothing'} is not a family; "
                        f"give a comma list of {', '.join(FAMILIES)}")
    return names


def plan_space(artifact: Artifact, goal: Goal, space: str = "full", only: tuple[str, ...] = FAMILIES,
               seed: int = 0, backend: str = "onnx") -> Plan:
    """The search's first pass, cheap first, for candidates that run on ``backend``. Compositions
    (quantizing what passed) and the halving rungs are added by the search as results come in."""
    if space not in SPACES:
        raise UserError(f"--space {space!r} is unknown; choose full or quick")
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is unknown; choose onnx (ONNX Runtime, default) or torch (PyTorch)")
    if backend == "torch" and not artifact.has_weights:
        raise UserError(f"{artifact.path}: is ONNX-only, so nothing of it runs on PyTorch; use --backend onnx")
    task = artifact.task
    params, samples = _model_size(artifact)
    plan = Plan(steps=[], task=task, params=params, train_samples=samples, backend=backend)
    cost = _Cost(plan, task)
    steps = plan.steps
    on_onnx = backend == "onnx"
    base = BASE if on_onnx and not artifact.has_onnx else INPUT
    if base == BASE:
        steps.append(Step(BASE, "export", INPUT, {}, "export", cost.fixed("export"), measure=True))
    if not artifact.has_weights:
        plan.notes.append("the input is ONNX-only: pruning, distillation and QAT need its PyTorch weights, so only "
                          "quantization is searched")
        only = tuple(f for f in only if f == "quantize")
    arch = artifact.model_spec.get("arch")
    if "quantize" in only:
        _plan_quantize(plan, artifact, goal, space, base, cost)
    if "qat" in only and not on_onnx:
        plan.notes.append("QAT left out: --qat writes an int8 ONNX model, which runs only on ONNX Runtime "
                          "(--backend onnx)")
        only = tuple(f for f in only if f != "qat")
    if "prune" in only:
        finetune = FINETUNE[task][space]
        for level in STRUCTURED_LEVELS[space]:
            name = f"sp-{round(level * 100)}"
            steps += _trained(Step(name, "prune", INPUT, {"method": "structured", "sparsity": level, "bench": False,
                                                          **_budget(task, finetune, "finetune-epochs"), "seed": seed},
                                   "prune", cost.train("prune", finetune), branch="structured"), cost, on_onnx)
        if goal.objective == "params":
            for level in MAGNITUDE_LEVELS[space]:
                name = f"mp-{round(level * 100)}"
                steps += _trained(Step(name, "prune", INPUT, {"method": "magnitude", "sparsity": level, "bench": False,
                                                              **_budget(task, finetune, "finetune-epochs"), "seed": seed},
                                       "prune", cost.train("prune", finetune), branch="magnitude"), cost, on_onnx)
        elif MAGNITUDE_LEVELS[space]:
            plan.notes.append("magnitude pruning left out: its zeros are stored and multiplied densely, so it changes "
                              "neither latency nor file size (docs/benchmarks.md, Pruning); it is searched for "
                              "--objective params")
    if "qat" in only:
        steps += _trained(Step("qat", "quantize", INPUT, {"qat": True, "bench": False,
                                                          **_budget(task, QAT[task], "finetune-epochs"), "seed": seed},
                               "qat", cost.train("qat", QAT[task])), cost, export=False)
    if "distill" in only:
        students = student_configs(artifact.model_spec, STUDENT_WIDTHS[space])
        shallow = shallow_students(artifact.model_spec, SHALLOW_WIDTHS[space])
        if not students:
            plan.notes.append(f"distillation left out: no smaller student is defined for arch {arch!r} "
                              "(mlp, cnn and gpt are; distil by hand with --student ARTIFACT)")
        epochs = DISTILL[task][space]
        for branch, group in (("distill", students), ("distill-shallow", shallow)):
            for name, config, fraction in group:
                steps += _trained(Step(name, "distill", INPUT, {"student-config": config, "bench-iterations": 0,
                                                                **_budget(task, epochs, "epochs"), "seed": seed},
                                       "distill", cost.train("distill", epochs, fraction), branch=branch,
                                       estimate_fraction=fraction), cost, on_onnx)
    return plan


def _plan_quantize(plan: Plan, artifact: Artifact, goal: Goal, space: str, base: str, cost: "_Cost") -> None:
    """The input quantized. ONNX Runtime: dynamic, static and MatMulNBits graphs (and weight-only
    int8/int4 for size or params). PyTorch runs none of those graphs: only weight-only int8/int4,
    which it decodes to float on load, so they are searched for size or params, never for latency."""
    steps = plan.steps
    if plan.backend == "onnx":
        modes = ("dynamic",) if space == "quick" else ("dynamic", "static", "matmul-nbits")
        for mode in modes:
            steps.append(Step(f"q-{mode}", "quantize", base, {"mode": mode, "bench": False}, "quantize",
                              cost.fixed("quantize"), measure=True))
    else:
        plan.notes.append("dynamic, static and matmul-nbits quantization left out: they write int8 ONNX graphs, "
                          "which run only on ONNX Runtime (--backend onnx)")
    if not artifact.has_weights or (space == "quick" and plan.backend == "onnx"):
        return
    if goal.objective == "latency":
        if plan.backend == "torch":
            plan.notes.append("weight-only int8/int4 left out for --objective latency: PyTorch decodes them to float "
                              "on load, so they change the file size only (searched for --objective size or params)")
        return
    # int8/int4 in model.safetensors: smaller files and fewer bytes, the same speed once loaded
    for bits in (8, 4) if space == "full" else (8,):
        steps.append(Step(f"q-wo{bits}", "quantize", INPUT, {"mode": "weight-only", "bits": bits, "bench": False},
                          "quantize", cost.fixed("quantize"), measure=True))


def _budget(task: str, amount: int, epochs_flag: str) -> dict:
    """Classifiers train for epochs; language models for optimizer steps (an epoch of a corpus is open-ended)."""
    return {epochs_flag: amount} if task == "classification" else {"max-steps": amount}


def training_amount(step: Step) -> tuple[str, int]:
    """The option that holds a training step's budget, and its value."""
    for key in ("finetune-epochs", "epochs", "max-steps"):
        if key in step.options:
            return key, int(step.options[key])
    raise KeyError(step.name)


def _trained(step: Step, cost: _Cost, export: bool = True) -> list[Step]:
    """A training step and the export that makes it measurable on ONNX Runtime (QAT ends in ONNX);
    on PyTorch (``export`` False) the trained artifact is measured itself."""
    if not export:
        step.measure = True
        return [step]
    return [step, export_of(step, cost.fixed("export"))]


def export_of(step: Step, estimate_s: float) -> Step:
    return Step(f"{step.name}.onnx", "export", step.name, {}, "export", estimate_s, branch=step.branch,
                rung=step.rung, measure=True)


def student_configs(spec: dict, widths: tuple[float, ...]) -> list[tuple[str, dict, float]]:
    """Students at each width fraction of the teacher: (name, --student-config, parameter fraction).
    The keys given replace the teacher's (distill inherits the rest)."""
    arch = spec.get("arch")
    out = []
    for width in widths:
        if arch in ("mlp", "cnn"):
            config = {"arch": arch, "hidden_sizes": [max(8, round(h * width)) for h in spec["hidden_sizes"]]}
            if arch == "cnn":
                config["channels"] = [max(4, round(c * width)) for c in spec["channels"]]
            if config.get("hidden_sizes") == spec["hidden_sizes"]:
                continue
        elif arch == "gpt":
            heads = spec["n_head"]
            embd = max(heads * 4, round(spec["n_embd"] * width / heads) * heads)
            config = {"arch": "gpt", "n_embd": embd}
            if width <= 0.25 and spec["n_layer"] > 1:
                config["n_layer"] = max(1, spec["n_layer"] // 2)
            if embd >= spec["n_embd"]:
                continue
        else:
            return []
        out.append((f"d-w{width * 100:g}".replace(".", "_"), config, width * width))
    return out


def shallow_students(spec: dict, widths: tuple[float, ...]) -> list[tuple[str, dict, float]]:
    """One-hidden-layer students of a deeper MLP teacher, at each fraction of its first width."""
    if spec.get("arch") != "mlp" or len(spec["hidden_sizes"]) < 2:
        return []
    first = spec["hidden_sizes"][0]
    return [(f"d-w{width * 100:g}-l1".replace(".", "_"), {"arch": "mlp", "hidden_sizes": [max(8, round(first * width))]},
             width / len(spec["hidden_sizes"])) for width in widths]


class _Cost:
    """Estimated seconds of a step: a fixed part per command, plus training FLOPs."""

    def __init__(self, plan: Plan, task: str):
        self.plan, self.task = plan, task

    def fixed(self, command: str) -> float:
        return FIXED_SECONDS[command] + MEASURE_SECONDS

    def train(self, command: str, amount: int, fraction: float = 1.0) -> float:
        # a sample is forward + backward ≈ 6 FLOPs per parameter (per token for a language model);
        # distillation also runs the teacher forward (2 FLOPs per teacher parameter)
        if self.task == "classification":
            steps = math.ceil(self.plan.train_samples / BATCH) * amount
            samples = self.plan.train_samples * amount
        else:
            steps = amount
            samples = BATCH * 32 * amount  # steps × batch × block, at the usual small-run sizes
        flops = (6 * max(fraction, 0.01) + (2 if command == "distill" else 0)) * self.plan.params * samples
        return FIXED_SECONDS[command] + steps * STEP_SECONDS[command] + flops / TRAIN_FLOPS_PER_SECOND


def _model_size(artifact: Artifact) -> tuple[int, int]:
    """Parameters of the input and training samples per epoch (classification), for the estimates."""
    from ..core.datasets import open_data
    from ..evaluate import size_stats

    params = size_stats(artifact)["params"]
    if artifact.task != "classification":
        return params, 0
    try:
        return params, len(open_data(artifact).arrays("train")[1])
    except UserError:
        return params, 1000

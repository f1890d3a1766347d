"""bigmodel train: options → TrainConfig → engine.training.loop → a results table.

The trainer's options are declared once (``_options``) and appended to other commands that train
(prune's fine-tuning, distill) with ``with_train_options``, so every flag has one name and one help.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import DataOpt, JsonOpt, SeedOpt, TargetOpt, ThreadsOpt, parse_int_list, parse_json_object

_M = "Model"
_O = "Optimisation"
_R = "Run"
_D = "Distributed"


def _options(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="mlp, cnn, gpt, or path/to/file.py:ClassOrFactory.", rich_help_panel=_M)] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Named size (see `bigmodel models`).", rich_help_panel=_M)] = None,
    model_args: Annotated[Optional[str], typer.Option("--model-args", help="JSON object of model arguments, e.g. '{\"hidden_sizes\": [64]}'.", rich_help_panel=_M)] = None,
    input_size: Annotated[Optional[int], typer.Option("--input-size", help="mlp input features.", rich_help_panel=_M)] = None,
    hidden_size: Annotated[Optional[int], typer.Option("--hidden-size", help="mlp: one hidden layer of this width.", rich_help_panel=_M)] = None,
    hidden_sizes: Annotated[Optional[str], typer.Option("--hidden-sizes", help="mlp/cnn head: widths, e.g. 512,512.", rich_help_panel=_M)] = None,
    output_size: Annotated[Optional[int], typer.Option("--output-size", help="Number of classes.", rich_help_panel=_M)] = None,
    data: DataOpt = None,
    target: TargetOpt = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Language models: a tokenizer directory (`bigmodel tokenizer train`); the model's vocabulary is sized from it. Default: bytes.", rich_help_panel=_M)] = None,
    augment: Annotated[Optional[str], typer.Option("--augment", help="Augment training batches on the fly: 'default', or policies like shift=1,rotate=10,noise=0.05 (images: shift, rotate, scale, cutout, flip, noise, mixup; tabular: noise, mixup). See docs/data.md.", rich_help_panel=_O)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over the training split.", rich_help_panel=_O)] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps (wins over --epochs).", rich_help_panel=_O)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Samples per micro-batch (all ranks together).", rich_help_panel=_O)] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="Language models: tokens per training window.", rich_help_panel=_O)] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="adamw, adam or sgd.", rich_help_panel=_O)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_O)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", rich_help_panel=_O)] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="sgd only.", rich_help_panel=_O)] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="cosine, linear or constant (after warm-up).", rich_help_panel=_O)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", rich_help_panel=_O)] = None,
    grad_clip: Annotated[Optional[float], typer.Option("--grad-clip", help="Max gradient norm; 0 disables.", rich_help_panel=_O)] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step.", rich_help_panel=_O)] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, bf16-mixed or auto.", rich_help_panel=_R)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.", rich_help_panel=_R)] = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate every N steps (default: each epoch).", rich_help_panel=_R)] = None,
    eval_windows: Annotated[Optional[int], typer.Option("--eval-windows", help="Language models: validation windows.", rich_help_panel=_R)] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help="Early stopping: evaluations without improvement.", rich_help_panel=_R)] = None,
    min_delta: Annotated[Optional[float], typer.Option("--min-delta", help="Early stopping: smallest improvement that counts.", rich_help_panel=_R)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints (default: each evaluation).", rich_help_panel=_R)] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option("--keep-checkpoints", rich_help_panel=_R)] = None,
    skip_nonfinite: Annotated[Optional[int], typer.Option("--skip-nonfinite", help="Skip up to N batches with NaN/Inf loss instead of stopping.", rich_help_panel=_R)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (best/, last/, checkpoints/, metrics.jsonl).", rich_help_panel=_R)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.", rich_help_panel=_R)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.", rich_help_panel=_R)] = False,
) -> None:
    """Only a signature: the trainer's options, shared by every command that trains."""


TRAIN_OPTIONS = list(inspect.signature(_options, eval_str=True).parameters.values())


def with_train_options(exclude: tuple[str, ...] = ()):
    """Append the trainer's options to a command; the command receives them as ``train_flags``
    (a dict of the options the user gave, in TrainConfig's names)."""

    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "train_flags"]
        names = {p.name for p in own}
        extra = [p for p in TRAIN_OPTIONS if p.name not in names and p.name not in exclude]

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {p.name: kwargs.pop(p.name) for p in extra}
            return command(**kwargs, train_flags=train_flags_from(given))

        wrapper.__signature__ = inspect.Signature(own + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}  # resolved, for Typer
        return wrapper

    return decorate


def train_flags_from(given: dict) -> dict:
    """Raw option values → TrainConfig keyword arguments (None = not given)."""
    flags = {k: v for k, v in given.items() if k not in ("model_args", "hidden_sizes", "out", "overwrite", "resume")}
    flags.update(model_args=parse_json_object(given.get("model_args"), "--model-args"),
                 hidden_sizes=parse_int_list(given.get("hidden_sizes"), "--hidden-sizes"))
    if "out" in given:
        flags["out"] = str(given["out"]) if given["out"] else None
    for key in ("overwrite", "resume"):
        if key in given:
            flags[key] = given[key] or None
    return flags


@with_train_options()
def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file of these options (a \\[train] table or top-level keys); flags win.", rich_help_panel=_R)] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="Continue from this artifact (or run directory): its architecture, weights and tokenizer; the result records it as its parent.", rich_help_panel=_M)] = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Train with N processes on this machine (starts torchrun workers; --batch-size stays the global batch).", rich_help_panel=_D)] = None,
    strategy: Annotated[Optional[str], typer.Option("--strategy", help="With several processes: ddp (replicate the model, default) or fsdp (shard parameters, gradients and optimizer state).", rich_help_panel=_D)] = None,
    json_out: JsonOpt = False,
    train_flags: dict | None = None,
) -> None:
    """Train a model (default: an MLP on the bundled digits) and write best/ and last/ artifacts."""
    from ..config import TrainConfig, build_config, read_toml
    from ..engine.training import launcher
    from ..engine.training.loop import run_job
    from ..engine.training.job import prepare_training
    from ..models.user import names_model_file, require_trust_for_file_reference

    file_values = read_toml(config, "train") if config else {}
    cfg = build_config(TrainConfig, file_values, {**(train_flags or {}), "init": init}, source=str(config or "config"))
    if config is not None and (train_flags or {}).get("model") is None and names_model_file(cfg.model):
        # The model file came from the TOML file, not from the user's command line.
        require_trust_for_file_reference(cfg.model, str(config), f"give it on the command line (--model {cfg.model})")
    launcher.check_options(nproc, strategy, cfg.device)
    job = prepare_training(cfg)
    job.strategy = strategy
    if nproc is not None and nproc > 1:
        # The workers run this same command without --nproc; rank 0 prints the results.
        try:
            launcher.launch(job, nproc, _forwarded_argv(ctx, drop=("nproc",)))
        finally:
            job.release_output()  # held for the workers while they ran
        return
    unit = "tokens/s" if job.task.name == "language-modeling" else "samples/s"
    result = run_job(job, _progress(unit, not json_out))
    if not result.is_main:  # another rank of a distributed run: rank 0 reports
        return
    summary = {
        "run_dir": str(result.run_dir), "best": str(result.best_dir), "last": str(result.last_dir),
        "steps": result.steps, "best_step": result.best_step, "stopped_early": result.stopped_early,
        "resumed_from": result.resumed_from, "seconds": result.seconds, **result.runtime,
        "best_metrics": result.best_metrics, "last_metrics": result.last_metrics,
    }
    if json_out:
        console.print_json(summary)
        return
    rows = [("run", summary["run_dir"]), ("steps", result.steps), ("seconds", result.seconds),
            ("device / precision", f"{result.runtime['device']} / {result.runtime['precision']}"),
            ("parameters", result.runtime["params"]), ("best step", result.best_step)]
    if "world_size" in result.runtime:
        rows.insert(4, ("processes / strategy", f"{result.runtime['world_size']} / {result.runtime['strategy']}"))
    rows += [(f"best {k}", v) for k, v in result.best_metrics.items() if k.startswith("val_")]
    rows += [(f"last {k}", v) for k, v in result.last_metrics.items() if k.startswith("val_")]
    if result.stopped_early:
        rows.append(("stopped early", "yes (patience)"))
    console.out.print(console.key_value_table("bigmodel train", rows))


def _forwarded_argv(ctx: typer.Context, drop: tuple[str, ...]) -> list[str]:
    """This command's options as the user gave them (from the parsed context, not sys.argv, which
    is not ours under a test runner or a recipe), minus ``drop``."""
    argv: list[str] = []
    for param in ctx.command.params:
        if param.name in drop or param.param_type_name != "option":
            continue
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if value:
                argv.append(param.opts[0])
        elif value is not None:
            argv += [param.opts[0], str(value)]
    return argv


def _progress(unit: str, enabled: bool):
    from .progress import TrainingProgress

    return TrainingProgress("train", unit, enabled)

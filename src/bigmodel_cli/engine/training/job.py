"""Setting up a training run: what a job is (``TrainJob``), and how a TrainConfig becomes one.

``prepare_training`` turns a TrainConfig into a TrainJob, checking everything (data, model, shapes)
before any work; engine/training/loop.py's ``run_job`` then runs it. Distillation and pruning build their
own TrainJob (a different loss, a different model) and reuse the loop unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ... import artifact as art
from ...output_lock import hold
from ...config import TrainConfig
from ...errors import UserError, first_line
from ...models import USER_ARCH, build_model, get_arch, resolve_spec
from ...models.user import names_model_file
from . import launcher
from ..core.tasks import make_task


@dataclass
class TrainJob:
    cfg: TrainConfig
    model: Any
    data: Any
    task: Any
    artifact_config: dict  # config.json of the artifacts this run writes
    stage: str = "train"
    parent: Any = None  # Artifact this run starts from (prune/distill)
    loss_fn: Callable | None = None  # (model, x, y) -> loss; default task.loss(model(x), y)
    aux: Any = None  # trainable modules that are checkpointed but not saved in the artifact
    extra_files: dict = field(default_factory=dict)  # name -> path copied into each artifact
    manifest_extra: dict = field(default_factory=dict)
    strategy: str | None = None  # under torchrun: "ddp" (default) or "fsdp"; one process ignores it
    lock: Any = None  # output_lock.OutputLock on cfg.out, held from the checks to the end of the run
    init_sha256: str | None = None  # train --init: the sha256 of the weights the run starts from
    # Evaluate the starting weights (step 0) and keep them as best/ unless a later evaluation beats
    # them: a fine-tune that must never hand back worse than it started (quantize --qat). Off for
    # `bigmodel train`, whose first weights are random.
    evaluate_start: bool = False

    def release_output(self) -> None:
        """Let another process write cfg.out (run_job calls it when the run ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def default_data(cfg: TrainConfig, arch_task: str | None, overrides: dict) -> str:
    """Which data to use when --data is not given."""
    if cfg.data:
        return cfg.data
    if arch_task == "language-modeling":
        return "text:stdlib"
    digits_shape = {"input_size": 64, "num_classes": 10, "in_channels": 1, "height": 8, "width": 8}
    # Only our own architectures' argument names mean a data shape; a user model's "width" is its own.
    if arch_task and any(k in overrides and overrides[k] != v for k, v in digits_shape.items()):
        return "synthetic"  # the user sized the model for other data: make data of that shape
    return "digits"


def _synthetic_shape(overrides: dict) -> dict:
    if "in_channels" in overrides or "height" in overrides:
        shape = [overrides.get("in_channels", 1), overrides.get("height", 8), overrides.get("width", 8)]
    else:
        shape = [overrides.get("input_size", 16)]
    return {"input_shape": shape, "num_classes": overrides.get("num_classes", 4)}


def resolve_model(cfg: TrainConfig, data, overrides: dict) -> dict:
    """The config.json model dict for this run, checked against the data."""
    if names_model_file(cfg.model):
        from ...models.user import parse_reference, trust_file

        path, entry = parse_reference(cfg.model)
        trust_file(path)  # the user named it on this command line
        return {"arch": USER_ARCH, "file": str(path.resolve()), "entry": entry, "args": dict(cfg.model_args)}
    arch = get_arch(cfg.model)
    if arch.task != data.task:
        fix = "--model gpt" if data.task == "language-modeling" else "classification data (--data digits|csv:PATH|npz:PATH)"
        raise UserError(f"--model {arch.name} is a {arch.task} model but the data is for {data.task}; use {fix}")
    spec = resolve_spec(arch.name, cfg.preset, overrides, data.model_fit())
    if data.task == "classification":
        _check_fit(spec, data)
    return spec


def _check_fit(spec: dict, data) -> None:
    fit = data.model_fit()
    shape = "×".join(map(str, data.input_shape))
    if spec["arch"] == "mlp" and spec["input_size"] != fit["input_size"]:
        raise UserError(
            f"model input size {spec['input_size']} does not fit the data ({shape} = {fit['input_size']} features); "
            f"drop --input-size or set it to {fit['input_size']}"
        )
    if spec["arch"] == "cnn":
        if len(data.input_shape) not in (2, 3):
            raise UserError(f"--model cnn needs image data (C×H×W); this data is {shape}; use --model mlp")
        want = (fit["in_channels"], fit["height"], fit["width"])
        have = (spec["in_channels"], spec["height"], spec["width"])
        if want != have:
            raise UserError(f"cnn input {have} does not fit the data ({want}); drop in_channels/height/width from --model-args")
    if spec["num_classes"] < data.num_classes:
        raise UserError(
            f"labels go up to {data.num_classes - 1} but the model has {spec['num_classes']} outputs; "
            f"drop --output-size or set it to at least {data.num_classes}"
        )


def _probe(model, task, spec: dict, data) -> None:
    """One forward pass on two real samples, so a misfit fails now with a clear message."""
    import torch

    example = torch.from_numpy(task.example_input(2))
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # the model, possibly the user's, rejected the input
        raise UserError(
            f"the model does not accept this data's input of shape {tuple(example.shape)}: "
            f"{first_line(exc, with_type=True)}; fix the model's input size"
        ) from None
    if data.task == "classification":
        if out.dim() != 2 or out.shape[0] != example.shape[0]:
            raise UserError(f"the model returned shape {tuple(out.shape)} for a batch of 2; a classifier must return (batch, classes)")
        if out.shape[1] < data.num_classes:
            raise UserError(f"the model has {out.shape[1]} outputs but the labels go up to {data.num_classes - 1}; widen its output layer")
    elif out.dim() != 3 or out.shape[-1] < data.spec["vocab_size"]:
        raise UserError(f"a language model must return (batch, seq, vocab ≥ {data.spec['vocab_size']}); got {tuple(out.shape)}")


def artifact_config(data, spec: dict, block_size: int | None, tokenizer: dict | None = None) -> dict:
    """config.json of what a run trains: the model, the data as it was fed (with the window length
    of a language model, which evaluation must use again) and, when text is read through one, the
    tokenizer's section (data/tokenizer.py)."""
    data_spec = dict(data.spec)
    if block_size:
        data_spec["block_size"] = block_size
    extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
    return art.new_config(data.task, spec, data_spec, **extra)


# Flags that choose the architecture or the tokenizer: with --init, the artifact has chosen them.
INIT_CONFLICTS = ("preset", "model_args", "input_size", "hidden_size", "hidden_sizes", "output_size", "tokenizer")


def open_init(cfg: TrainConfig) -> art.Artifact | None:
    """--init's artifact (a run directory gives its best/), with weights to start from; None
    without --init. A flag that would change its architecture or tokenizer is refused."""
    if not cfg.init:
        return None
    parent = art.open_artifact(cfg.init)
    given = [f"--{key.replace('_', '-')}" for key in INIT_CONFLICTS if getattr(cfg, key) not in (None, {}, [])]
    # --model may only name what the artifact already is (TrainConfig.model is the default, "mlp")
    if cfg.model not in (TrainConfig.model, parent.model_spec.get("arch")):
        given.insert(0, "--model")
    if given:
        raise UserError(f"--init {cfg.init}: {', '.join(given)} would change the model or tokenizer the artifact "
                        f"fixes; drop {'it' if len(given) == 1 else 'them'} (the architecture and the tokenizer "
                        "come from the artifact)")
    parent.require_weights()
    return parent


def prepare_training(cfg: TrainConfig) -> TrainJob:
    """Validate the whole configuration and build data, model and task. No training yet.

    The job holds the lock on ``cfg.out`` from here on (``run_job`` releases it), so a second
    writer is refused before it does any work."""
    cfg.validate()
    overrides = cfg.model_overrides()
    init = open_init(cfg)
    if init is not None:
        arch_task = init.task
    else:
        arch_task = None if names_model_file(cfg.model) else get_arch(cfg.model).task
    data_arg = default_data(cfg, arch_task, overrides)
    # Workers started by --nproc write into the output their launching process holds.
    lock = None if launcher.under_torchrun() else hold(cfg.out)
    try:
        if init is not None:
            return _prepare_from(cfg, init, data_arg, lock)
        return _prepare(cfg, overrides, data_arg, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def input_paths(cfg: TrainConfig, data_arg: str | None) -> list[str]:
    """The files a training run reads (its data, a user's model file): --out may not hold them."""
    paths = []
    name, _, arg = (data_arg or "").partition(":")
    if name in ("csv", "npz", "text") and arg and arg != "stdlib":
        paths.append(arg)
    if ":" in cfg.model and cfg.model.split(":")[0].endswith(".py"):
        paths.append(cfg.model.split(":")[0])
    if cfg.tokenizer:
        paths.append(cfg.tokenizer)
    if cfg.init:
        paths.append(cfg.init)
    return paths


def open_training_tokenizer(cfg: TrainConfig, arch_task: str | None):
    """--tokenizer's tokenizer (data/tokenizer.py) and its tokenizer.json path, or (None, None) for bytes."""
    if not cfg.tokenizer:
        return None, None
    if arch_task not in (None, "language-modeling"):
        raise UserError(f"--tokenizer is for language models, but --model {cfg.model} is a {arch_task} model; "
                        "drop --tokenizer or train a language model (--model gpt)")
    from ...data.tokenizer import TOKENIZER_FILE, open_tokenizer_dir

    tokenizer, _ = open_tokenizer_dir(cfg.tokenizer)
    return tokenizer, Path(cfg.tokenizer) / TOKENIZER_FILE


def check_vocab_fits(spec: dict, tokenizer) -> None:
    """The model needs an embedding row for every token id the tokenizer can produce."""
    rows = spec.get("vocab_size")
    if isinstance(rows, int) and rows < tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocab_size is {rows:,}; "
                        f"drop vocab_size from --model-args (it is sized from the tokenizer) or set it to at least "
                        f"{tokenizer.vocab_size:,}")


def lm_block_size(cfg: TrainConfig, spec: dict) -> int:
    """Tokens per training window: --block-size, else the model's context up to 256."""
    limit = spec.get("block_size")
    block_size = cfg.block_size or (min(limit, 256) if limit else 128)
    if limit and block_size > limit:
        raise UserError(f"--block-size {block_size} is longer than the model's context ({limit}); lower it or raise block_size")
    return block_size


def _prepare_from(cfg: TrainConfig, parent: art.Artifact, data_arg: str, lock) -> TrainJob:
    """prepare_training for --init: the parent's model section, weights and tokenizer, the user's
    data and optimisation. The result records the parent (manifest parent + lineage)."""
    import torch

    from ...data import load_dataset, parse_data_arg
    from ...data.tokenizer import TOKENIZER_FILE

    if not cfg.resume and launcher.env_rank() == 0:
        art.check_output(cfg.out, cfg.overwrite, input_paths(cfg, data_arg), lock_probe=lock is not None)
    tokenizer = parent.tokenizer() if parent.config.get("tokenizer") is not None else None
    data = load_dataset(parse_data_arg(data_arg, cfg.target), tokenizer)
    if data.task != parent.task:
        raise UserError(f"--init {cfg.init} is a {parent.task} model but --data {data_arg} is {data.task} data; "
                        "give data of the model's kind")
    spec = dict(parent.model_spec)
    block_size = None
    if data.task == "classification":
        data.check_trainable()
        if spec["arch"] in ("mlp", "cnn"):
            _check_fit(spec, data)
    else:
        block_size = lm_block_size(cfg, spec)
    task = make_task(data, cfg.batch_size, cfg.seed, block_size, cfg.eval_windows)
    torch.manual_seed(cfg.seed)
    model = parent.build_model()  # the parent's weights, verified against its manifest
    _probe(model, task, spec, data)
    extra_files = {}
    if spec["arch"] == USER_ARCH:
        extra_files[art.MODEL_CODE_FILE] = parent.path / art.MODEL_CODE_FILE
    data_spec = dict(data.spec)
    if block_size:
        data_spec["block_size"] = block_size
    extra = {}
    if tokenizer is not None:
        extra["tokenizer"] = parent.config["tokenizer"]
        extra_files[TOKENIZER_FILE] = parent.path / TOKENIZER_FILE
    config = art.new_config(data.task, spec, data_spec, **extra)
    weights = parent.manifest["files"][art.WEIGHTS_FILE]["sha256"]
    return TrainJob(cfg=cfg, model=model, data=data, task=task, artifact_config=config, parent=parent,
                    extra_files=extra_files, lock=lock, init_sha256=weights,
                    manifest_extra={"init": {"path": str(parent.path), "stage": parent.stage, "weights_sha256": weights}})


def _prepare(cfg: TrainConfig, overrides: dict, data_arg: str, lock) -> TrainJob:
    """prepare_training's work, once the output is locked."""
    import torch

    from ...data import load_dataset, parse_data_arg
    from ...data.augment import policy_from_option

    if not cfg.resume and launcher.env_rank() == 0:  # other ranks would race rank 0 creating it
        art.check_output(cfg.out, cfg.overwrite, input_paths(cfg, data_arg), lock_probe=lock is not None)
    arch_task = None if names_model_file(cfg.model) else get_arch(cfg.model).task
    tokenizer, tokenizer_path = open_training_tokenizer(cfg, arch_task)
    data = load_dataset(parse_data_arg(data_arg, cfg.target, **_synthetic_shape(overrides)), tokenizer)
    if tokenizer is not None and data.task != "language-modeling":
        raise UserError(f"--tokenizer is for language models, but --data {data_arg} is {data.task} data; drop --tokenizer")
    if data.task == "classification":
        data.check_trainable()
    spec = resolve_model(cfg, data, overrides)
    if tokenizer is not None:
        check_vocab_fits(spec, tokenizer)
    block_size = lm_block_size(cfg, spec) if data.task == "language-modeling" else None
    augment = policy_from_option(cfg.augment, data)
    task = make_task(data, cfg.batch_size, cfg.seed, block_size, cfg.eval_windows, augment)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    _probe(model, task, spec, data)
    extra_files = {}
    if spec["arch"] == USER_ARCH:
        extra_files[art.MODEL_CODE_FILE] = Path(spec["file"])
        spec = {**spec, "file": art.MODEL_CODE_FILE}
    if tokenizer is not None:  # the artifact carries its tokenizer (data/tokenizer.py's contract)
        extra_files[tokenizer_path.name] = tokenizer_path
    config = artifact_config(data, spec, block_size, tokenizer.section if tokenizer is not None else None)
    return TrainJob(cfg=cfg, model=model, data=data, task=task, artifact_config=config, extra_files=extra_files,
                    lock=lock, manifest_extra={"augment": augment} if augment else {})

"""Training checkpoints: everything a resumed run needs to continue bit for bit, without pickle.

``checkpoints/step-NNNNNNNN/`` holds ``model.safetensors``, ``optimizer.safetensors`` (the
optimizer's tensors and the RNG states) and ``state.json`` (step, best metric, early-stopping
counters, the optimizer's non-tensor state, file hashes). The data position needs no state: the
batch for a step is a pure function of (seed, step). Each checkpoint is written atomically, so a
directory named step-* is always complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...artifact import atomic_directory, file_entries, sha256_file
from ...errors import UserError
from ...weights import load_into, save_model_weights

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
AUX_FILE = "aux.safetensors"


def _optimizer_split(optimizer) -> tuple[dict, dict]:
    """optimizer.state_dict() → (tensors for safetensors, the rest as JSON)."""
    import torch

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> dict:
    import torch

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def restore_rng(tensors: dict) -> None:
    import torch

    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, aux=None, keep: int = 2) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:08d}"
    with atomic_directory(target, overwrite=True) as staging:
        save_model_weights(model, staging / "model.safetensors")
        if aux is not None:
            save_model_weights(aux, staging / AUX_FILE)
        tensors, meta = _optimizer_split(optimizer)
        save_file({**tensors, **rng_tensors()}, str(staging / OPTIMIZER_FILE))
        record = {**state, "step": step, "optimizer": meta, "files": file_entries(staging)}
        (staging / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*"))
    return found[-1] if found else None


# state.json's keys and the types save_checkpoint writes them with (None where a run has no best yet).
_STATE_TYPES = {"step": (int,), "best": (int, float, type(None)), "best_step": (int,), "bad_evals": (int,),
                "skipped": (int,), "files": (dict,), "optimizer": (dict,)}


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, checked for the shape save_checkpoint writes (a damaged one is one
    line that says how to go on, not a crash deep in the resume)."""
    advice = f"delete {path} to resume from an earlier checkpoint"
    try:
        if (path / STATE_FILE).stat().st_size > 64 << 20:  # ours are a few KB (optimizer metadata)
            raise ValueError("larger than 64 MB")
        record = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: unreadable checkpoint state ({exc}); {advice}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path / STATE_FILE}: is not a JSON object; {advice}")
    for key, types in _STATE_TYPES.items():
        value = record.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise UserError(f"{path / STATE_FILE}: {key!r} is {value!r}, not what bigmodel writes; {advice}")
    if record["step"] < 0 or not isinstance(record["optimizer"].get("param_groups"), list) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in record["files"].values()):
        raise UserError(f"{path / STATE_FILE}: damaged (step, optimizer or file list); {advice}")
    if not isinstance(record.get("best_metrics", {}), dict):
        raise UserError(f"{path / STATE_FILE}: 'best_metrics' is not an object; {advice}")
    return record


def load_checkpoint(path: Path, model, optimizer, aux=None) -> dict:
    """Restore model, optimizer, aux modules and RNG from a checkpoint; return its state.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = read_state(path)
    for name, entry in record["files"].items():
        if not (path / name).is_file() or sha256_file(path / name) != entry["sha256"]:
            raise UserError(f"{path / name}: does not match its recorded hash; delete {path} to resume from an earlier checkpoint")
    try:
        load_into(model, load_file(path / "model.safetensors"), source=path / "model.safetensors")
        if aux is not None:
            load_into(aux, load_file(path / AUX_FILE), source=path / AUX_FILE)
        tensors = load_file(path / OPTIMIZER_FILE)
    except SafetensorError as exc:
        raise UserError(f"{path}: corrupt checkpoint ({exc}); delete it to resume from an earlier one") from None
    try:
        optimizer.load_state_dict(_optimizer_join(tensors, record["optimizer"]))
        restore_rng(tensors)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # state.json is not hashed: it may be edited
        raise UserError(f"{path}: the optimizer state does not fit this run ({type(exc).__name__}: {exc}); "
                        f"delete {path} to resume from an earlier checkpoint") from None
    return record

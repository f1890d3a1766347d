"""A training run directory's record (run.json), the --resume check against it, and its metrics log
(metrics.jsonl).

Apart from the loop (``loop.py``) so that the launcher can check --resume before any worker
starts without importing the loop. ``job`` is a ``training.job.TrainJob``; it is not imported
here, because job.py imports the launcher, which imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path

from ... import artifact as art
from ...config import asdict
from ...errors import UserError
from ...output_file import atomic_path

RUN_FILE = "run.json"
# Options that may change between a run and its --resume without changing the result. The output
# path is where the run is, not what it is: a run may be resumed under another spelling or after a move.
RESUME_MAY_CHANGE = {"resume", "overwrite", "threads", "keep_checkpoints", "device", "out"}


def run_fingerprint(job) -> dict:
    options = {k: v for k, v in asdict(job.cfg).items() if k not in RESUME_MAY_CHANGE}
    record = {"options": options, "model": job.artifact_config["model"], "stage": job.stage}
    tokenizer = getattr(job.data, "spec", {}).get("tokenizer_sha256")
    if tokenizer:  # the same --tokenizer path could hold another tokenizer by now
        record["tokenizer_sha256"] = tokenizer
    if job.init_sha256:  # the same --init path could hold other weights by now
        record["init_sha256"] = job.init_sha256
    return record


def check_resume(job) -> Path:
    """--resume: the run directory exists and was started with the same options (reads only)."""
    run_dir = Path(job.cfg.out)
    record = run_fingerprint(job)
    previous = read_run_file(run_dir)
    changed = sorted(
        k for k in set(previous["options"]) | set(record["options"])
        if previous["options"].get(k) != record["options"].get(k)
    )
    if changed:
        detail = ", ".join(f"{k} ({previous['options'].get(k)!r} → {record['options'].get(k)!r})" for k in changed)
        raise UserError(f"--resume: options differ from the run being resumed: {detail}; resume with the same options")
    if previous.get("tokenizer_sha256") != record.get("tokenizer_sha256"):
        raise UserError("--resume: the tokenizer is not the one the run started with (its tokenizer.json changed); "
                        "resume with the original tokenizer or start a new run")
    if previous.get("init_sha256") != record.get("init_sha256"):
        raise UserError("--resume: the --init artifact's weights are not the ones the run started from (its "
                        "model.safetensors changed); resume with the original artifact or start a new run")
    return run_dir


def read_run_file(run_dir: Path) -> dict:
    """run.json of a run to resume, checked for the shape this module writes."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise UserError(f"--resume: {run_dir} has no {RUN_FILE}; it is not a training run directory (drop --resume to start one)")
    try:
        if path.stat().st_size > 1 << 20:  # ours are a few KB
            raise ValueError("larger than 1 MB")
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"--resume: {path} is damaged ({exc}); start the run again with --overwrite") from None
    if not isinstance(previous, dict) or not isinstance(previous.get("options"), dict):
        raise UserError(f"--resume: {path} has no options object (damaged or not written by bigmodel); "
                        "start the run again with --overwrite")
    # Runs written before the output path stopped counting recorded it; it may differ now.
    previous["options"] = {k: v for k, v in previous["options"].items() if k not in RESUME_MAY_CHANGE}
    return previous


METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if step_of(line) is not None and step_of(line) <= resume_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(art.jsonable(record)) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one cut short by a killed process."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else None
    except json.JSONDecodeError:
        return None


class NoLog:
    """metrics.jsonl on ranks other than 0: they write nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass

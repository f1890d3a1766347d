"""The state file of a ``bigmodel run`` directory: each step's command line and fingerprint.

``cli/recipe.py`` writes it; ``engine/compare.py`` reads it to expand a run directory into its
artifact steps. It lives here, below both, so that reading it never imports the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...output_file import write_json_atomic

STATE_FILE = "run-state.json"


def load_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def save_state(run_dir: Path, state: dict) -> None:
    write_json_atomic(run_dir / STATE_FILE, state)

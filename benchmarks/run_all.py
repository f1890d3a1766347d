"""Run every benchmark script in this folder (each writes its section of docs/benchmarks.md)."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
# needs Optimum, which cannot be installed beside the project's transformers: `make bench-optimum`
# runs it in its own venv
OWN_VENV = {"generate_optimum.py"}
failed = []
for script in sorted(here.glob("*.py")):
    if script.name.startswith("_") or script.name == "run_all.py" or script.name in OWN_VENV:
        continue
    print(f"== {script.name}", flush=True)
    if subprocess.call([sys.executable, str(script)]) != 0:
        failed.append(script.name)
sys.exit(1 if failed else 0)

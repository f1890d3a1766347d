"""bigmodel run RECIPE: the steps of a recipe in order, then the comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import JsonOpt


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (TOML): [[steps]] with name, command, from and options.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: the recipe's [run] out, else runs/RECIPE-NAME).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start from scratch: replace the run directory (only one bigmodel wrote; the old run is kept until the new one has finished).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a step option: STEP.OPTION=VALUE (repeatable).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Validate the recipe and print the commands; run nothing.")] = False,
    compare_rounds: Annotated[int, typer.Option("--compare-rounds", help="Timed latency calls per artifact in the final comparison.")] = 30,
    json_out: JsonOpt = False,
) -> None:
    """Run a recipe (train → prune → distill → quantize → export …); finished steps are skipped on a rerun."""
    from .recipe import artifact_outputs, check_model_code_trust, run_recipe
    from .recipe_file import command_group, command_params, parse_recipe, step_argv, step_command
    from ..engine.compare import compare_artifacts
    from .compare import print_comparison, write_reports

    parsed = parse_recipe(recipe, set_ or [])
    run_dir = out or Path(parsed.out or f"runs/{recipe.stem}")
    if check:
        group = command_group()
        for step in parsed.steps:
            argv = step_argv(step, run_dir, command_params(step_command(group, step.command)))
            console.out.print(f"[bold]{step.name}[/]: bigmodel " + " ".join(argv), highlight=False)
        check_model_code_trust(parsed)  # after the commands: they show what the code would be run by
        return

    def announce(index, total, step, status, argv):
        verb = {"skipped": "skipped (complete and unchanged)", "resumed": "resuming", "ran": "running"}[status]
        console.err.rule(f"[bold]step {index}/{total} · {step.name}[/] · {verb}")
        console.note("bigmodel " + " ".join(argv))

    outcomes = run_recipe(parsed, run_dir, overwrite=overwrite, announce=announce)
    artifacts = [path for _, path in artifact_outputs(parsed, run_dir)]
    result = compare_artifacts(artifacts, rounds=compare_rounds) if artifacts else None
    written = write_reports(result, run_dir / "compare.png", run_dir / "compare.md", None) if result else []
    if json_out:
        console.print_json({"run_dir": str(run_dir), "steps": [vars(o) for o in outcomes],
                            "compare": result.rows if result else None})
        return
    if result:
        print_comparison(result)
    for path in written:
        console.note(f"wrote {path}")

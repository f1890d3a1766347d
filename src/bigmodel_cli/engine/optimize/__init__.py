"""``bigmodel optimize``: the best model under a limit and a budget, found by a budgeted search over
the existing commands (quantize, prune, distill, export), with the Pareto front that shows the choice.

space.py   the goal (limit, budgets, objective) and the candidate space with cost estimates
steps.py   one candidate step → the engine function of its command (the same options a recipe gives)
search.py  the cheap-first, branch-stopping, successive-halving search; its resumable state file
front.py   which candidates meet the goal, the Pareto front, the choice
report.py  the front's table (compare's columns), the trade-off plot, report.md/html, the recipe TOML
command.py the one engine call: the goal checked, the output policy (as `bigmodel run`), --dry-run's plan
"""

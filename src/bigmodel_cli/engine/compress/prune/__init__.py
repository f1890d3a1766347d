"""The methods behind ``bigmodel prune`` (orchestrated by ``engine/compress/prune/command.py``).

- ``plan``       the cubic sparsity schedule, kept-width rounding, N:M patterns, --ignore
- ``magnitude``  unstructured L1 magnitude and N:M masks (torch.nn.utils.prune), made permanent
- ``structured`` removes units, channels and heads of the built-in architectures; the new widths
                 go into config.json, so the pruned model rebuilds from its config alone
- ``user_graph`` Torch-Pruning's dependency graph for users' own models, and the JSON record that
                 lets such a model reload at its pruned shapes without pickle
- ``report``     before/after measurements: sizes, task metric, torch / ONNX Runtime latency side by side
"""

"""The three ways to make a trained model smaller or faster, one package each: ``prune``,
``quantize`` and ``distill``; each holds its command (``command.py``) and the pieces behind it."""

"""bigmodel: train, prune, quantize, distill and export neural networks, with honest measurements.

The small public Python API (the CLI is a thin layer over the same functions)::

    from bigmodel_cli import TrainConfig, train, open_artifact, evaluate_artifact
    result = train(TrainConfig(model="mlp", out="runs/digits"))
    print(evaluate_artifact(open_artifact(result.best_dir), split="test"))
"""

__version__ = "0.1.0"

__all__ = ["__version__", "TrainConfig", "train", "open_artifact", "evaluate_artifact"]


def __getattr__(name: str):
    # Lazy, so `import bigmodel_cli` (and `bigmodel --help`) does not import torch.
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "train":
        from .engine.training.loop import train

        return train
    if name == "open_artifact":
        from .artifact import open_artifact

        return open_artifact
    if name == "evaluate_artifact":
        from .engine.evaluate import evaluate_artifact

        return evaluate_artifact
    raise AttributeError(name)

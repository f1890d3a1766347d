"""``bigmodel info``: what an artifact is, read from its files without running any model code.

Per-tensor sizes, dtypes and sparsity come straight from safetensors (or the ONNX initializers),
so even an artifact whose model is user code can be inspected without trusting that code.
"""

from __future__ import annotations

from collections import OrderedDict

from ..artifact import Artifact


def tensor_table(artifact: Artifact) -> list[dict]:
    """One row per weight tensor: name, shape, dtype, parameters, zeros, sparsity."""
    rows = []
    if artifact.has_weights:
        from safetensors import safe_open

        with safe_open(artifact.path / "model.safetensors", framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                numel = tensor.numel()
                zeros = int((tensor == 0).sum()) if numel else 0
                rows.append({"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", ""),
                             "params": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0})
        return rows
    from .onnx.runtime import onnx_tensor_table

    return onnx_tensor_table(artifact)


def parameter_counts(artifact: Artifact, onnx: bool = False) -> tuple[int, int]:
    """(parameters, zeros) of the model's weights — one number per weight, however it is stored.

    Float tensors count as they are. A weight-only quantized checkpoint packs int8/int4 weights
    with per-channel scales, so it is counted after dequantization (the scales are not parameters).
    ONNX initializers are already filtered to weights by the runtime module, int8 ones included.
    """
    if onnx or not artifact.has_weights:
        from .onnx.runtime import onnx_tensor_table

        rows = onnx_tensor_table(artifact)
        return sum(r["params"] for r in rows), sum(r["zeros"] for r in rows)
    if (artifact.config.get("quantization") or {}).get("mode") == "weight-only":
        tensors = artifact.load_state_dict().values()
        return sum(t.numel() for t in tensors), sum(int((t == 0).sum()) for t in tensors)
    rows = [r for r in tensor_table(artifact) if r["dtype"].startswith(("float", "bfloat"))]
    return sum(r["params"] for r in rows), sum(r["zeros"] for r in rows)


def layer_groups(rows: list[dict], depth: int = 2) -> list[dict]:
    """Sum tensors by the first ``depth`` parts of their names (e.g. blocks.0, net.2)."""
    groups: OrderedDict[str, dict] = OrderedDict()
    for row in rows:
        parts = row["name"].split(".")[:-1] or [row["name"]]
        key = ".".join(parts[:depth])
        group = groups.setdefault(key, {"group": key, "params": 0, "zeros": 0, "dtypes": set()})
        group["params"] += row["params"]
        group["zeros"] += row["zeros"]
        group["dtypes"].add(row["dtype"])
    out = []
    for g in groups.values():
        out.append({"group": g["group"], "params": g["params"], "sparsity": g["zeros"] / g["params"] if g["params"] else 0.0,
                    "dtype": ",".join(sorted(g["dtypes"]))})
    return out


def describe(artifact: Artifact) -> dict:
    rows = tensor_table(artifact)
    params, zeros = parameter_counts(artifact)
    return {
        "path": str(artifact.path),
        "stage": artifact.stage,
        "task": artifact.task,
        "model": artifact.model_spec,
        "data": {k: v for k, v in artifact.data_spec.items() if k not in ("normalization", "class_names")},
        **({"tokenizer": artifact.config["tokenizer"]} if artifact.config.get("tokenizer") is not None else {}),
        "files": {name: entry.get("bytes") for name, entry in artifact.manifest.get("files", {}).items()},
        "params": params,
        "nonzero_params": params - zeros,
        "sparsity": zeros / params if params else 0.0,
        "dtypes": sorted({r["dtype"] for r in rows}),
        "groups": layer_groups(rows),
        "layers": [r for r in rows if len(r["shape"]) >= 2],
        "lineage": artifact.lineage(),
        "metrics": artifact.metrics,
        "created": artifact.manifest.get("created"),
        "versions": artifact.manifest.get("versions", {}),
    }

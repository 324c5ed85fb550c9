"""Shared helpers for the ml tests: small ONNX graphs and completion batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ublk_driver.records import COMPLETION_DTYPE

GOOD_META = {"ublkml.kind": "fail_slow", "ublkml.features": "peer_lat_ratio,peer_p99_ratio",
             "ublkml.output": "probability that the path is fail-slow",
             "ublkml.threshold": "0.5", "ublkml.version": "0.1"}


def sigmoid_model(meta: dict[str, str] | None = GOOD_META, n_features: int = 2,
                  batch: Any = "N", in_type: int = TensorProto.FLOAT,
                  out_shape: list[Any] | None = None, raw: bool = False) -> bytes:
    """score = sigmoid(sum(x) - n_features): a tiny hand-made "classifier"."""
    out_shape = out_shape if out_shape is not None else [batch, 1]
    x = helper.make_tensor_value_info("x", in_type, [batch, n_features])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, out_shape)
    nodes = []
    src = "x"
    if in_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        src = "xf"
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    off = helper.make_tensor("off", TensorProto.FLOAT, [], [float(n_features)])
    nodes += [helper.make_node("ReduceSum", [src, "axes"], ["s"], keepdims=1),
              helper.make_node("Sub", ["s", "off"], ["z"])]
    if raw:
        nodes.append(helper.make_node("Identity", ["z"], ["r"]))
    else:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["r"]))
    if len(out_shape) == 2 and out_shape[1] not in (1, "1"):
        nodes.append(helper.make_node("Concat", ["r"] * int(out_shape[1]), ["score"], axis=1))
        inits = [axes, off]
    elif len(out_shape) == 1:
        shape = helper.make_tensor("shape", TensorProto.INT64, [1], [-1])
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["score"]))
        inits = [axes, off, shape]
    else:
        nodes.append(helper.make_node("Identity", ["r"], ["score"]))
        inits = [axes, off]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (meta or {}).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def batch(n: int, paths: int = 1, lat_ns: float = 50_000, slow_path: int | None = None,
          factor: float = 4.0, seed: int = 0, t0: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = np.zeros(n, dtype=COMPLETION_DTYPE)
    r["t_ns"] = t0 + np.sort(rng.integers(0, 100_000_000, n))
    r["path"] = rng.integers(0, paths, n)
    lat = rng.lognormal(np.log(lat_ns), 0.3, n)
    if slow_path is not None:
        lat = np.where(r["path"] == slow_path, lat * factor, lat)
    r["lat_ns"] = lat
    r["length"] = 4096
    r["result"] = 4096
    return r


def ml_main(argv: list[str]) -> int:
    """``ublkml ml ARGV...`` in this process; its exit status."""
    from ublk_driver.core.cli import main

    return main(["ml", *argv])


def model_main(argv: list[str]) -> int:
    """``ublkml model ARGV...`` in this process; its exit status."""
    from ublk_driver.core.cli import main

    return main(["model", *argv])

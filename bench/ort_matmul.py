"""ONNX Runtime's f32 MatMul (MLAS) at a MiniLM layer's four linear shapes: the
counterpart of `cargo bench --bench linear` (same shapes, same timing rule: the
fastest of 7 timings of ~50 ms of calls), for bench/linear_vs_ort.sh.

The weight is a graph initializer, so ONNX Runtime may pre-pack it at session
creation, as it does for the exported encoder in bench/run.sh (e).

Usage: ort_matmul.py --rows 1736 [--rows 64 ...] --threads 2
Prints one line per (rows, shape): "m=<rows> <shape> ort <GFLOP/s> GFLOP/s".
"""

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (name, out channels n, inputs k), as in benches/linear.rs.
SHAPES = [("qkv", 1152, 384), ("attn_out", 384, 384), ("ffn_in", 1536, 384), ("ffn_out", 384, 1536)]


def session(w: np.ndarray, threads: int) -> ort.InferenceSession:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def fastest(f) -> float:
    """Seconds per call: the fastest of 7 timings of enough calls for ~50 ms."""
    f()
    t = time.perf_counter()
    f()
    once = max(time.perf_counter() - t, 1e-6)
    reps = min(max(int(0.05 / once), 1), 1000)
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(reps):
            f()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, action="append", required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for m in args.rows:
        for name, n, k in SHAPES:
            s = session(rng.uniform(-1, 1, (k, n)).astype(np.float32), args.threads)
            x = rng.uniform(-1, 1, (m, k)).astype(np.float32)
            secs = fastest(lambda: s.run(None, {"x": x}))
            print(f"m={m} {name} ort {2 * m * n * k / secs / 1e9:.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()

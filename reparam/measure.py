"""Latency and environment measurement shared by ``reparam demo`` and ``benchmarks/``.

Timings are medians over repeated runs, and candidates compared with each other are measured
interleaved (A, B, A, B, ...) in one process so that machine noise hits them alike.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["environment", "interleaved_medians", "interleaved_times", "ort_runner", "ort_session", "paired_ratio",
           "torch_runner", "torch_threads"]


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3,
                      collect: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin: entry ``i`` of every list is from round ``i``.

    ``collect``: run the garbage collector (untimed) before every call, so each starts from the same heap.
    Results held in reference cycles (an fx GraphModule) are otherwise freed at random later points, and a
    call allocating hundreds of megabytes then pays for fresh memory pages that another call does not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if collect:
                gc.collect()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns: Mapping[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3,
                        collect: bool = False) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats, warmup, collect).items()}


def paired_ratio(times: Mapping[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` timed in the same round: drift over the run cancels in each pair."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with torch on ``threads`` intra-op threads, restoring the previous count afterwards."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def torch_runner(model, inputs: tuple, threads: int = 1) -> Callable[[], Any]:
    """A no-grad call of ``model(*inputs)`` pinned to ``threads`` intra-op threads."""
    import torch

    def run():
        with torch_threads(threads), torch.inference_mode():
            return model(*inputs)

    return run


def ort_session(model: Any, threads: int = 1, optimize: str = "basic"):
    """An ONNX Runtime CPU session on a path or ModelProto; ``optimize`` is disable/basic/extended/all."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimize]
    so.log_severity_level = 3
    src = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_runner(session, feeds: dict) -> Callable[[], Any]:
    """A call of ``session.run`` on fixed feeds, for ``interleaved_medians``."""
    return lambda: session.run(None, feeds)


def environment(threads: int = 1) -> dict[str, Any]:
    """Machine and library versions, recorded with every benchmark result."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for mod in ("numpy", "torch", "onnx", "onnxruntime", "onnx_graphsurgeon"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env

"""Deployment cost, side by side: size, FLOPs, accuracy, latency and throughput in PyTorch and onnxruntime.

The paper distils because a big model (or an ensemble) is too slow to deploy (§1); this measures how much a
distilled student buys. For each model: parameters, weights on disk, FLOPs per example (2 x the multiply-adds
of its matrix products and convolutions, counted by ``torch.utils.flop_counter``; element-wise ops are not
counted), test errors, latency at batch 1 (median and 99th percentile over many calls, after a warm-up) and
throughput at a large batch (batch size / median time of a call). Every call runs real test inputs; both
runtimes use the same number of threads.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import checkpoint
from .errors import DarkKnowledgeError
from .evaluation import as_inputs, evaluate, labels_of, predict_logits
from .export import (export_onnx, load_deployable, locate, model_inputs, onnx_feed, onnx_session, run_onnx,
                     test_set)
from .models import count_parameters


@dataclass(frozen=True)
class BenchConfig:
    threads: int = 1  # torch.set_num_threads and onnxruntime's intra-op threads
    batch_size: int = 1024  # for throughput
    latency_calls: int = 300  # batch-1 calls timed for the median and p99
    throughput_calls: int = 20  # large-batch calls timed (fewer when max_seconds runs out)
    warmup: int = 10  # untimed calls first: lazy allocation, caches, thread pools
    max_seconds: float = 20.0  # per measurement; stops early but times at least 20 batch-1 / 3 large-batch calls
    onnx: bool = True  # also export to ONNX and time onnxruntime

    def __post_init__(self):
        for name in ("threads", "batch_size", "latency_calls", "throughput_calls"):
            if getattr(self, name) < 1:
                raise DarkKnowledgeError(f"bench: {name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise DarkKnowledgeError(f"bench: warmup must be 0 or more, got {self.warmup}")
        if not self.max_seconds > 0:
            raise DarkKnowledgeError(f"bench: max_seconds must be positive, got {self.max_seconds}")

    @classmethod
    def quick(cls, threads: int = 1) -> BenchConfig:
        """A few seconds per model: enough for a model card's speed line, too few calls for a trusted p99."""
        return cls(threads=threads, latency_calls=50, throughput_calls=5, warmup=3, max_seconds=2.0)


@contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_calls(call: Callable[[int], Any], calls: int, warmup: int, max_seconds: float,
               min_calls: int) -> np.ndarray:
    """Seconds taken by each of up to ``calls`` calls ``call(i)``, after ``warmup`` untimed ones."""
    for i in range(warmup):
        call(i)
    times = []
    deadline = time.perf_counter() + max_seconds
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
        if len(times) >= min_calls and time.perf_counter() > deadline:
            break
    return np.array(times)


def _speed(latencies: np.ndarray, batch_times: np.ndarray, batch_size: int) -> dict[str, Any]:
    return {"latency_ms_median": float(np.median(latencies) * 1e3),
            "latency_ms_p99": float(np.percentile(latencies, 99) * 1e3),
            "throughput_per_s": float(batch_size / np.median(batch_times)),
            "latency_calls": len(latencies), "throughput_calls": len(batch_times), "batch_size": batch_size}


def flops_per_example(model: nn.Module, image_shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> int:
    """FLOPs of one forward pass on one example (2 per multiply-add of matmuls and convolutions); ``dtype``: the
    inputs' (int64 token ids and mask for a text classifier)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *image_shape, dtype=dtype))
    return int(counter.get_total_flops())


def measure_speed(model: nn.Module, images: torch.Tensor, config: BenchConfig,
                  onnx_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Latency at batch 1 and throughput at ``config.batch_size`` on uint8 ``images`` (cycled through), in
    PyTorch and, when ``onnx_path`` is given, in onnxruntime."""
    if len(images) == 0:
        raise DarkKnowledgeError("bench: no test images to time on")
    model = model.eval()
    singles = [as_inputs(images[i:i + 1].clone()) for i in range(min(len(images), 64))]
    batch = as_inputs(images[torch.arange(config.batch_size) % len(images)].clone())  # tiled if the set is small
    common = dict(warmup=config.warmup, max_seconds=config.max_seconds)
    result = {}
    with torch_threads(config.threads), torch.inference_mode():
        latencies = time_calls(lambda i: model(singles[i % len(singles)]), config.latency_calls, min_calls=20,
                               **common)
        batch_times = time_calls(lambda i: model(batch), config.throughput_calls, min_calls=3, **common)
    result["pytorch"] = _speed(latencies, batch_times, config.batch_size)
    if onnx_path is not None:
        session = onnx_session(onnx_path, config.threads)
        singles_np = [onnx_feed(session, s.numpy()) for s in singles]
        batch_np = onnx_feed(session, batch.numpy())
        latencies = time_calls(lambda i: session.run(None, singles_np[i % len(singles_np)]),
                               config.latency_calls, min_calls=20, **common)
        batch_times = time_calls(lambda i: session.run(None, batch_np), config.throughput_calls,
                                 min_calls=3, **common)
        result["onnxruntime"] = _speed(latencies, batch_times, config.batch_size)
    return result


def bench_run(run: str | os.PathLike, config: BenchConfig, data_dir: str | None = None,
              workdir: str | os.PathLike | None = None, data_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Every measurement of one run directory (or ensemble folder), as a JSON-ready dict (on ``data_path``'s
    files when given, else the data the run records)."""
    deployable = load_deployable(run)
    model = deployable.model
    test = test_set(deployable, data_dir, data_path)
    inputs, labels = model_inputs(test, len(test)), labels_of(test)
    accuracy = evaluate(model, test)
    entry: dict[str, Any] = {
        "run": deployable.name, "kind": deployable.kind, "model": deployable.spec, "dataset": deployable.dataset,
        "parameters": count_parameters(model), "weights_bytes": deployable.weight_bytes,
        "flops_per_example": flops_per_example(model, deployable.image_shape, as_inputs(inputs[:1]).dtype),
        "test_errors": accuracy.errors, "test_total": accuracy.total, "test_accuracy": accuracy.accuracy,
    }
    onnx_path = None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if config.onnx:
            onnx_path = export_onnx(model, Path(tmp) / "model.onnx", deployable.image_shape, example=inputs)
            entry["onnx_bytes"] = onnx_path.stat().st_size
        speed = measure_speed(model, inputs, config, onnx_path)
        if onnx_path is not None:  # the same answers, or the timing compares different things
            session = onnx_session(onnx_path, config.threads)
            scores = run_onnx(session, as_inputs(inputs.clone()).numpy(), 1000)
            with torch_threads(config.threads):
                expected = predict_logits(model, inputs).numpy()
            speed["onnxruntime"]["max_abs_diff"] = float(np.abs(scores - expected).max())
            speed["onnxruntime"]["test_errors"] = int((scores.argmax(1) != labels.numpy()).sum())
    entry.update(speed)
    return entry


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def bench_runs(runs: list[str | os.PathLike], config: BenchConfig | None = None, data_dir: str | None = None,
               log: Callable[[str], None] | None = None,
               data_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Bench each run in turn (never in parallel: they would compete for the cores); one JSON-ready dict."""
    config = config or BenchConfig()
    if not runs:
        raise DarkKnowledgeError("bench needs at least one run directory")
    for run in runs:  # a typo in the last run should not cost the minutes spent timing the first ones
        locate(run)
    models = []
    for run in runs:
        if log:
            log(f"benchmarking {run} ...")
        models.append(bench_run(run, config, data_dir, data_path=data_path))
    return {"config": asdict(config), "machine": machine(), "provenance": checkpoint.provenance(), "models": models}


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of a :func:`bench_runs` result; throughputs also relative to the first model."""
    config, models = result["config"], result["models"]
    runtimes = ["pytorch"] + (["onnxruntime"] if all("onnxruntime" in m for m in models) else [])
    label = {"pytorch": "PyTorch", "onnxruntime": "ORT"}
    header = ["model", "spec", "parameters", "weights MB", "MFLOPs/case", "test errors"]
    for rt in runtimes:
        header += [f"{label[rt]} latency ms (median / p99)", f"{label[rt]} cases/s", f"{label[rt]} x first"]
    rows = []
    for m in models:
        row = [m["run"], m["model"], f"{m['parameters']:,}", _megabytes(m["weights_bytes"]),
               f"{m['flops_per_example'] / 1e6:.3f}",
               f"{m['test_errors']}/{m['test_total']} ({100 * (1 - m['test_accuracy']):.2f}%)"]
        for rt in runtimes:
            s = m[rt]
            row += [f"{s['latency_ms_median']:.3f} / {s['latency_ms_p99']:.3f}", f"{s['throughput_per_s']:,.0f}",
                    f"{s['throughput_per_s'] / models[0][rt]['throughput_per_s']:.2f}x"]
        rows.append(row)
    machine_info = result["machine"]
    title = (f"batch-1 latency over up to {config['latency_calls']} calls, throughput at batch "
             f"{config['batch_size']}, {config['threads']} thread(s); {machine_info['cpu']}, torch "
             f"{machine_info['torch']}" + (f", onnxruntime {machine_info['onnxruntime']}"
                                           if "onnxruntime" in machine_info else ""))
    right = set(range(2, len(header)))
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return title + "\n\n" + "\n".join(lines)

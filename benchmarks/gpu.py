"""What issue 30 measures on a GPU, in one JSON file: the §2 loss at a large vocabulary, one language-model
distillation step, and image epochs, each beside what it is compared with, in one process.

- ``loss``: at V = 128,256 over 8,192 positions (``--small``: 512 over 256), forward + backward of the naive
  ``F.kl_div`` and of :func:`darkknowledge.losses.distillation_loss` against dense logits, top-32 and sampled
  (16 exact + 16 drawn) targets, chunked as sized for the device (and at the CPU's sizing, on CUDA, to show what the
  device sizing buys): seconds (best of ``--repeats``) and peak memory above the inputs (CUDA only).
- ``llm``: a Llama-style pair (``transformers.LlamaConfig``: ~1.24B teacher, ~257M student, both with the vocabulary
  above; ``--small``: tiny ones) on 8 x 1,024-token windows of random ids, bf16 autocast on CUDA, AdamW (fused on
  CUDA), through ``fit``: labels only; the teacher online; a top-32 token store; a compact store (issue 31:
  12 exact + 21 drawn, packed, at T = 1); plus a hand-written online step with
  the naive KL, and the store's build; tokens/s each and the ratios the issue targets.
- ``images``: an ``mlp:800x2`` on MNIST (``--small``: digits), one epoch each: a hand-written loop that keeps the
  data on the device, ``fit`` on labels, ``fit`` from a store, ``fit`` with the teacher online; seconds each.

    python benchmarks/gpu.py --out gpu.json            # on a CUDA machine (the sizes of issue 30)
    python benchmarks/gpu.py --small --out small.json  # anywhere in seconds (the default on a machine without CUDA)

The numbers are the machine's; docs/speed.md says how to read them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from darkknowledge import feeding
from darkknowledge.checkpoint import atomic_write
from darkknowledge.data.text import TokenWindows
from darkknowledge.jobs import DataChoice
from darkknowledge.losses import (CHUNK_ELEMENTS, chunk_rows_for, distillation_loss, sampled_targets,
                                  topk_targets)
from darkknowledge.models import build_model
from darkknowledge.outputs import logits_of
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.training import Distillation, HardTargets, TrainConfig, fit

FULL = {"vocab": 128_256, "positions": 8192, "batch": 8, "context": 1024, "windows": 64, "dataset": "mnist",
        "teacher": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8),
        "student": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=4)}
SMALL = {"vocab": 512, "positions": 256, "batch": 2, "context": 32, "windows": 8, "dataset": "digits",
         "teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
         "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1)}
TOP_K, HEAD, DRAWS, T = 32, 16, 16, 2.0
COMPACT_HEAD, COMPACT_DRAWS = 12, 21  # the compact layout docs/language-models.md recommends (64 B at V = 4,096)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work, device: torch.device, repeats: int) -> float:
    """Best wall time of ``work()`` over ``repeats`` runs after one untimed warm-up."""
    work()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        work()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def peak_mb(work, device: torch.device) -> float | None:
    """Peak device memory of ``work()`` above what was allocated before it (CUDA; None elsewhere)."""
    if device.type != "cuda":
        work()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# -- the loss -----------------------------------------------------------------------------------------------------

def loss_speed(size: dict, device: torch.device, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    n, vocab = size["positions"], size["vocab"]
    z = torch.randn(n, vocab, device=device, generator=g, requires_grad=True)
    v = torch.randn(n, vocab, device=device, generator=g) * 3
    top = topk_targets(v, TOP_K)
    drawn = sampled_targets(v, DRAWS, generator=torch.Generator(device=device).manual_seed(1), head=HEAD)
    cpu_rows = max(1, CHUNK_ELEMENTS // vocab)

    def step(temperature: float = T, chunk_rows: int | None = None, **targets):
        def run():
            z.grad = None
            distillation_loss(z, temperature=temperature, chunk_rows=chunk_rows, **targets).total.backward()
        return run

    def naive():
        z.grad = None
        (F.kl_div(torch.log_softmax(z / T, -1), torch.softmax(v / T, -1), reduction="batchmean") * T * T).backward()

    variants = {"naive": naive, "dense": step(teacher_logits=v), "topk": step(topk_targets=top),
                "sampled": step(1.0, topk_targets=drawn)}  # drawn at T = 1, used at T = 1
    if device.type == "cuda":  # what the device sizing replaced
        variants["dense_cpu_chunks"] = step(teacher_logits=v, chunk_rows=cpu_rows)
        variants["topk_cpu_chunks"] = step(topk_targets=top, chunk_rows=cpu_rows)
    out = {"vocab": vocab, "positions": n, "chunk_rows": chunk_rows_for(vocab, device), "cpu_chunk_rows": cpu_rows}
    for name, work in variants.items():
        out[name] = {"seconds": timed(work, device, repeats), "peak_mb": peak_mb(work, device)}
    for name in variants:
        if name != "naive":
            out[name]["time_vs_naive"] = out[name]["seconds"] / out["naive"]["seconds"]
            if out["naive"]["peak_mb"]:
                out[name]["memory_vs_naive"] = out[name]["peak_mb"] / out["naive"]["peak_mb"]
    return out


# -- one language-model step --------------------------------------------------------------------------------------

def llama(shape: dict, vocab: int, context: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=context, tie_word_embeddings=True, **shape)
    return LlamaForCausalLM(config)


def llm_speed(size: dict, device: torch.device, repeats: int) -> dict:
    vocab, context, batch = size["vocab"], size["context"], size["batch"]
    ids = np.random.default_rng(0).integers(0, vocab, size["windows"] * context + 1)
    windows = TokenWindows(ids, context, "random", vocab)
    torch.manual_seed(0)
    teacher = llama(size["teacher"], vocab, context).to(device).eval()
    student = llama(size["student"], vocab, context).to(device)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    fused = {"fused": True} if device.type == "cuda" else {}
    config = TrainConfig(epochs=1, batch_size=batch, lr=1e-4, schedule="constant", optimizer="adamw",
                         optimizer_options=fused, bf16=device.type == "cuda", progress=False)
    tokens = len(windows) * context
    out = {"teacher_parameters": sum(p.numel() for p in teacher.parameters()),
           "student_parameters": sum(p.numel() for p in student.parameters()),
           "tokens_per_epoch": tokens, "batch_tokens": batch * context, "precision": config.precision}

    def epoch(objective):
        def run():
            student.load_state_dict(initial)
            fit(student, windows, None, config, objective, device=device, log=lambda _: None)
        return run

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as folder:
        started = time.perf_counter()
        store = SoftTargets.build(teacher, windows, Path(folder) / "store", tokenizer_sha256="benchmark",
                                   top_k=TOP_K, batch_windows=batch, log=lambda _: None)
        synchronize(device)
        out["store_build_tokens_per_s"] = tokens / (time.perf_counter() - started)
        out["store_bytes_per_token"] = store.bytes_per_case
        # issue 31's compact rows (12 exact + 21 drawn), decoded per batch on the host: at T = 1, as draws must be
        compact = SoftTargets.build(teacher, windows, Path(folder) / "store", tokenizer_sha256="benchmark",
                                    head=COMPACT_HEAD, samples=COMPACT_DRAWS, compact="log8", batch_windows=batch,
                                    log=lambda _: None)
        out["compact_store_bytes_per_token"] = compact.bytes_per_case
        runs = {"labels": HardTargets(), "online": Distillation(T, teacher=teacher),
                "store": Distillation(T, store=store), "compact_store": Distillation(1.0, store=compact)}
        for name, objective in runs.items():
            out[f"{name}_tokens_per_s"] = tokens / timed(epoch(objective), device, repeats)
    out["online_naive_tokens_per_s"] = naive_online(teacher, student, windows, config, device, repeats)
    out["store_vs_labels_time"] = out["labels_tokens_per_s"] / out["store_tokens_per_s"]
    out["compact_store_vs_labels_time"] = out["labels_tokens_per_s"] / out["compact_store_tokens_per_s"]
    out["store_vs_online_naive_speed"] = out["store_tokens_per_s"] / out["online_naive_tokens_per_s"]
    return out


def naive_online(teacher, student, windows, config: TrainConfig, device: torch.device, repeats: int) -> float:
    """Tokens/s of a hand-written online step: teacher forward, student forward, ``F.kl_div`` on all positions."""
    optimizer = config.make_optimizer(student.parameters())
    order = torch.arange(len(windows)).split(config.batch_size)
    dtype = torch.bfloat16 if config.bf16 else torch.float32

    def run():
        for indices in order:
            inputs, _ = windows.batch(indices)
            inputs = inputs.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=config.bf16):
                with torch.no_grad():
                    v = logits_of(teacher(inputs)).float()
                z = logits_of(student(inputs)).float()
            loss = F.kl_div(torch.log_softmax(z / T, -1).flatten(0, 1), torch.softmax(v / T, -1).flatten(0, 1),
                            reduction="batchmean") * T * T
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return len(windows) * windows.context / timed(run, device, repeats)


# -- image epochs -------------------------------------------------------------------------------------------------

def image_speed(size: dict, device: torch.device, repeats: int, batch_size: int) -> dict:
    train, _, _ = DataChoice(size["dataset"], val_size=0).load()
    torch.manual_seed(0)
    teacher = build_model("mlp:1200x2", train.image_shape, train.num_classes).to(device).eval()
    student = build_model("mlp:800x2", train.image_shape, train.num_classes)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=0.05, schedule="constant", progress=False)
    store = SoftTargets.compute(teacher, train)

    def epoch(objective):
        def run():
            student.load_state_dict(initial)
            fit(student, train, None, config, objective, device=device, log=lambda _: None)
        return run

    def hand_loop():
        student.load_state_dict(initial)
        student.to(device).train()
        images, labels = train.images.to(device), train.labels.to(device)
        optimizer = config.make_optimizer(student.parameters())
        for indices in torch.randperm(len(train), device=device).split(batch_size):
            loss = F.cross_entropy(student(images[indices].float() / 255), labels[indices])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    out = {"dataset": size["dataset"], "cases": len(train), "batch_size": batch_size,
           "inputs_resident": feeding.ResidentInputs.of(train, device, feeding.free_bytes(device)) is not None
           if device.type == "cuda" else False}
    out["hand_loop_seconds"] = timed(hand_loop, device, repeats)
    for name, objective in {"fit": HardTargets(), "store": Distillation(T, store=store),
                            "online_teacher": Distillation(T, teacher=teacher)}.items():
        out[f"{name}_seconds"] = timed(epoch(objective), device, repeats)
    out["fit_vs_hand_loop"] = out["fit_seconds"] / out["hand_loop_seconds"]
    out["store_vs_fit"] = out["store_seconds"] / out["fit_seconds"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu.json"), help="the JSON file to write")
    parser.add_argument("--small", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-batch", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    small = args.small or device.type != "cuda"
    size = SMALL if small else FULL
    if device.type == "cpu":
        torch.set_num_threads(1)
    result = {"command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "size": "small" if small else "full", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__}
    for name, measure in (("loss", lambda: loss_speed(size, device, args.repeats)),
                          ("llm", lambda: llm_speed(size, device, args.repeats)),
                          ("images", lambda: image_speed(size, device, args.repeats, args.image_batch))):
        started = time.perf_counter()
        result[name] = measure()
        print(f"{name}: {json.dumps(result[name])} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

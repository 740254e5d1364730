"""Peak memory of one distillation step's loss (forward + backward) at a 32,000-token vocabulary.

Each variant runs in a fresh process: the student logits ``[positions, V]`` (float32, requires grad) and the
targets are made first, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), then the loss is
computed and backpropagated, and the growth of the peak over the resident size before the step is reported.

- ``naive``: what a tutorial loop does, ``F.kl_div(log_softmax(z/T), softmax(v/T)) * T^2`` on the whole batch:
  the teacher's dense probabilities and the student's log-probabilities exist for every position at once.
- ``chunked-logits``: :func:`darkknowledge.losses.distillation_loss` from the same full teacher logits.
- ``chunked-topk``: the same loss from a top-32 summary (what the token store holds): no dense teacher input.

The logits and their gradient (2 x positions x V x 4 bytes) are the floor any method pays.

    python benchmarks/loss_memory.py [--positions 2048] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def run_variant(variant: str, positions: int, vocab: int) -> dict:
    from darkknowledge.losses import distillation_loss, topk_targets
    torch.manual_seed(0)
    z = torch.randn(positions, vocab, requires_grad=True)
    v = torch.randn(positions, vocab) * 3
    targets = topk_targets(v, 32) if variant == "chunked-topk" else None
    if targets is not None:
        del v
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    if variant == "naive":
        loss = F.kl_div(torch.log_softmax(z / 2.0, -1), torch.softmax(v / 2.0, -1), reduction="batchmean") * 4.0
    elif variant == "chunked-logits":
        loss = distillation_loss(z, v, temperature=2.0).total
    else:
        loss = distillation_loss(z, topk_targets=targets, temperature=2.0).total
    loss.backward()
    return {"variant": variant, "peak_growth_mb": (_status("VmHWM") - before) / 2 ** 20,
            "logits_mb": positions * vocab * 4 / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.positions, args.vocab)))
        return
    print(f"positions {args.positions}, vocabulary {args.vocab}: one [positions, V] float32 tensor is "
          f"{args.positions * args.vocab * 4 / 2 ** 20:.0f} MB")
    for variant in ("naive", "chunked-logits", "chunked-topk"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--positions", str(args.positions),
                              "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
        print(f"{variant:>15}: peak growth during loss + backward {result['peak_growth_mb']:7.0f} MB "
              f"({result['peak_growth_mb'] / result['logits_mb']:.2f} x one [positions, V] tensor)")


if __name__ == "__main__":
    main()

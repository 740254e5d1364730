"""Sizing: does a 32-draw sampled store keep more of the dense store's gain than a top-32 one? A small version of
reproduce lm (3 members of gpt:layers=1,dim=64 on 100,000 training tokens, 2 epochs, T = 1 only) that trains
students from the dense, top-32 and sampled-32 stores. Numbers in sampled.json (validation and test, labelled).

Usage (from the repository root): RUNS=/path/outside/the/tree python results/lm/sizing/sampled.py
"""
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from darkknowledge.experiments.lm import FULL, reproduce_lm

torch.set_num_threads(1)
plan = replace(FULL, spec="gpt:layers=1,dim=64,heads=4,context=128", half_spec="gpt:layers=1,dim=32,heads=4,context=128",
               members=3, temperatures=(1,), top_ks=(32,), sampled=(32,), max_train_tokens=100_000, sample_tokens=20)
r = reproduce_lm(Path(os.environ["RUNS"]) / "lm-sampled-sizing", plan=plan, progress=False,
                 command="RUNS=... python results/lm/sizing/sampled.py", log=lambda line: print(line, flush=True))
rows = {row["store"]: {k: row[k] for k in ("bytes_per_token", "val_log_loss", "val_accuracy", "test_log_loss",
                                            "test_accuracy", "share_of_dense_gain_log_loss",
                                            "share_of_dense_gain_accuracy")} for row in r["top_k"]}
baseline = r["models"]["baseline"]
out = {"command": r["command"], "plan": r["plan"], "baseline": baseline, "stores": rows,
       "seconds": r["total_seconds"]}
(Path(__file__).parent / "sampled.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out["stores"], indent=1))

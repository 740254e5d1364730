"""Sizing: does a 32-draw sampled store keep more of the dense store's gain than a top-32 one? The run is the
``sampled-sizing`` plan of ``reproduce lm`` (3 members of gpt:layers=1,dim=64 on 100,000 training tokens, 2 epochs,
T = 1 only, students from the dense, top-32 and sampled-32 stores); this script only copies its stores' rows
from the run's results.json into sampled.json (validation and test, labelled).

Usage (from the repository root):
    darkknowledge reproduce lm --plan sampled-sizing --no-progress --out RUNS/lm-sampled-sizing
    python results/lm/sizing/sampled.py RUNS/lm-sampled-sizing
"""
import json
import sys
from pathlib import Path

r = json.loads((Path(sys.argv[1]) / "results.json").read_text())
rows = {row["store"]: {k: row[k] for k in ("bytes_per_token", "val_log_loss", "val_accuracy", "test_log_loss",
                                            "test_accuracy", "share_of_dense_gain_log_loss",
                                            "share_of_dense_gain_accuracy")} for row in r["top_k"]}
out = {"command": r["command"], "plan": r["plan"], "baseline": r["models"]["baseline"], "stores": rows,
       "seconds": r["total_seconds"]}
(Path(__file__).parent / "sampled.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out["stores"], indent=1))

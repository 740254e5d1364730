"""Validation numbers of a stopped results/lm-6epochs run (RUNS/lm-6epochs): each finished run's best epoch from
its model.json, and the 10-member ensemble evaluated on the validation works. Usage: python THIS (RUNS=/work/runs)."""
import json
import os
from pathlib import Path
from dataclasses import replace
import torch
from darkknowledge.experiments.lm import FULL, prepare_data
from darkknowledge.language_model import EnsembleLM, evaluate_language_model, load_language_model
torch.set_num_threads(1)
out = Path(os.environ.get("RUNS", "/work/runs")) / "lm-6epochs"
plan = replace(FULL, training=replace(FULL.training, epochs=6), student_training=replace(FULL.student_training, epochs=6))
splits = prepare_data(plan, out, None, lambda _: None)
rows = {}
for run in sorted((out / "runs").iterdir()):
    meta_path = run / "model.json"
    if not meta_path.exists() or run.name.startswith("token"):
        continue
    meta = json.loads(meta_path.read_text())
    best = min(meta["history"], key=lambda h: h["val_log_loss"])
    rows[run.name] = {"val_log_loss": round(best["val_log_loss"], 4), "val_accuracy": round(best["val_accuracy"], 4),
                      "best_epoch": best["epoch"]}
members = [load_language_model(out / "runs" / f"member-{i}")[0] for i in range(10)]
e = evaluate_language_model(EnsembleLM(members), splits.windows["validation"])
rows["ensemble"] = {"val_log_loss": round(e["log_loss"], 4), "val_accuracy": round(e["accuracy"], 4)}
print(json.dumps(rows, indent=1))

"""Sizing ``reproduce lm`` by regime: with the same compute as the FULL plan's 2 epochs of 400,000 tokens, do
members trained for more epochs on fewer tokens gain more from being ensembled? MEMBERS members of the FULL spec
and recipe (seeds 0 ..) are trained for EPOCHS epochs on the first TOKENS training tokens, each keeping its best
validation epoch, and the validation log-loss and accuracy of each member and of the ensembles of the first 2 ..
MEMBERS members are printed and written to OUT/regime.json. Validation only; no test number is read.

Usage (from the repository root): python results/lm/sizing/regime.py OUT TOKENS EPOCHS [MEMBERS]
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from darkknowledge.experiments.lm import FULL, prepare_data
from darkknowledge.language_model import EnsembleLM, evaluate_language_model, train_language_model

torch.set_num_threads(1)
out, tokens, epochs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
count = int(sys.argv[4]) if len(sys.argv) > 4 else 3
plan = replace(FULL, max_train_tokens=tokens, training=replace(FULL.training, epochs=epochs))
splits = prepare_data(plan, out, None, print)
train, val = splits.windows["train"], splits.windows["validation"]


def scores(model) -> dict:
    e = evaluate_language_model(model, val)
    return {"val_log_loss": round(e["log_loss"], 4), "val_accuracy": round(e["accuracy"], 4)}


members, result = [], {"train_tokens": tokens, "epochs": epochs, "members": {}, "ensembles": {}}
for seed in range(count):
    model, meta = train_language_model(plan.spec, splits.tokenizer, train, val, replace(plan.training, seed=seed),
                                       run_dir=out / f"member-{seed}")
    members.append(model)
    result["members"][f"member-{seed}"] = {**scores(model), "best_epoch": meta["best_epoch"], "history": [{k: round(v, 4) for k, v in h.items() if k in ("epoch", "val_log_loss", "val_accuracy")} for h in meta["history"]]}
    if len(members) > 1:
        result["ensembles"][f"first {len(members)}"] = scores(EnsembleLM(members))
    print(json.dumps(result), flush=True)
    (out / "regime.json").write_text(json.dumps(result, indent=1) + "\n")

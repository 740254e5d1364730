"""Sizing the next FULL plan of ``reproduce lm``: does a pair of members trained longer gain more from being
ensembled? Two members of the FULL spec (seeds 0 and 1) are trained for EPOCHS epochs on the FULL plan's 400,000
training tokens (data and tokenizer reused from the FULL run's folder), and the validation log-loss and accuracy of
each member and of their 2-member ensemble are printed as JSON, beside the same for the FULL run's 2-epoch
members 0 and 1. Validation only; no test number is read.

Usage (from the repository root): python results/lm/sizing/run.py FULL_RUN_FOLDER OUT_FOLDER [EPOCHS]
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from darkknowledge.experiments.lm import FULL, prepare_data
from darkknowledge.language_model import EnsembleLM, evaluate_language_model, load_language_model, train_language_model

torch.set_num_threads(1)
full, out = Path(sys.argv[1]), Path(sys.argv[2])
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 6
splits = prepare_data(FULL, full, None, print)
tokenizer, train, val = splits.tokenizer, splits.windows["train"], splits.windows["validation"]


def scores(model) -> dict:
    e = evaluate_language_model(model, val)
    return {"val_log_loss": round(e["log_loss"], 4), "val_accuracy": round(e["accuracy"], 4)}


result = {}
for name, members in (("2 epochs (FULL run)", [load_language_model(full / "runs" / f"member-{i}")[0] for i in (0, 1)]),
                      (f"{epochs} epochs", [train_language_model(FULL.spec, tokenizer, train, val,
                                                                 replace(FULL.training, epochs=epochs, seed=i),
                                                                 run_dir=out / f"member-{i}")[0] for i in (0, 1)])):
    result[name] = {"member-0": scores(members[0]), "member-1": scores(members[1]),
                    "ensemble of both": scores(EnsembleLM(members))}
    print(json.dumps({name: result[name]}), flush=True)
(out / "sizing.json").write_text(json.dumps(result, indent=1) + "\n")

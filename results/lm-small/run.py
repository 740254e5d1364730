"""§4 on text with the FULL plan's models and recipe on fewer tokens: 100,000 training tokens, one epoch per
model, validation and test capped at 65,536 tokens each (512 windows), so the whole run takes about half an hour on
one core. A first measurement of the pipeline and of the ensemble's gain at this scale, not the FULL result.

Usage (from the repository root): DARKKNOWLEDGE_DATA=../shared/data python results/lm-small/run.py
"""
from dataclasses import replace

import torch

from darkknowledge.experiments.lm import FULL, reproduce_lm

torch.set_num_threads(1)
plan = replace(FULL, max_train_tokens=100_000, max_eval_tokens=65_536, training=replace(FULL.training, epochs=1),
               student_training=replace(FULL.student_training, epochs=1))
reproduce_lm("results/lm-small", plan=plan, progress=False, command="python results/lm-small/run.py",
             log=lambda line: print(line, flush=True))

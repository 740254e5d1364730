"""Is tokenising the bottleneck of a text classifier's epoch? One training epoch of the same small BERT classifier
on the same lines, two ways:

- ``cached``: the texts tokenised once (what ``--data TABLE --text-column`` does, cached beside the run), a batch
  one gather of ids and masks;
- ``on the fly``: a torch ``Dataset`` that tokenises each line in ``__getitem__`` (the usual tutorial's way),
  batched through ``DatasetTransferSet``.

Also the time to tokenise every line once (the cache's whole cost, paid on the first run). Each epoch is timed
``--repeats`` times after an untimed warm-up; the best of each is reported.

    python benchmarks/text_tokenize_speed.py --table lines.csv --tokenizer tokenizer.json [--max-length 32]
        [--threads 1] [--repeats 2] [--json FILE]

``lines.csv`` and ``tokenizer.json``: the ones docs/text-classifiers.md makes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from darkknowledge.data import DatasetTransferSet
from darkknowledge.data.text_table import load_text_table, load_tokenizer, pad_id, read_table
from darkknowledge.models import build_model
from darkknowledge.training import TrainConfig, fit

MODEL = "hf-classifier:bert,num_hidden_layers=2,hidden_size=128,num_attention_heads=4,intermediate_size=256"


class OnTheFly(Dataset):
    """Each item tokenised when it is read: ``([2, L] ids and mask, label)``."""

    def __init__(self, texts, labels, tokenizer, max_length):
        self.texts, self.labels, self.tokenizer = texts, labels, tokenizer
        tokenizer.enable_truncation(max_length)  # set once, as the cached path does for all lines at once
        tokenizer.enable_padding(pad_id=pad_id(tokenizer), length=max_length)

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        encoded = self.tokenizer.encode(self.texts[i])
        return torch.tensor([encoded.ids, encoded.attention_mask]), int(self.labels[i])


def epoch_seconds(data, vocab_size: int, config: TrainConfig, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        torch.manual_seed(0)
        model = build_model(f"{MODEL},vocab_size={vocab_size}", (2, config_length(data)), 2)
        started = time.perf_counter()
        fit(model, data, None, config, log=lambda _: None)
        times.append(time.perf_counter() - started)
    return min(times[1:])


def config_length(data) -> int:
    return data.batch(torch.arange(1))[0].shape[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    cached = load_text_table(args.table, ("text",), "label", args.tokenizer, args.max_length).train
    tokenise_all = time.perf_counter() - started
    frame = read_table(args.table.resolve())
    frame = frame[frame["split"] != "test"] if "split" in frame.columns else frame
    classes = sorted(frame["label"].unique())
    tokenizer = load_tokenizer(args.tokenizer)
    fly = DatasetTransferSet(OnTheFly(frame["text"].tolist(), frame["label"].map(classes.index).tolist(), tokenizer,
                                      args.max_length), classes=classes, name="on-the-fly")
    config = TrainConfig(epochs=1, batch_size=64, optimizer="adamw", lr=1e-3, progress=False)
    vocab = tokenizer.get_vocab_size()
    result = {"cases": len(cached), "max_length": args.max_length, "threads": args.threads, "model": MODEL,
              "tokenise_every_line_s": round(tokenise_all, 3),
              "epoch_cached_s": round(epoch_seconds(cached, vocab, config, args.repeats), 3),
              "epoch_on_the_fly_s": round(epoch_seconds(fly, vocab, config, args.repeats), 3)}
    result["on_the_fly_x_cached"] = round(result["epoch_on_the_fly_s"] / result["epoch_cached_s"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The ``darkknowledge`` command: parses and validates options, then calls the library. Nothing else here.

Options may come from a TOML file (``--config FILE``, keys named like the long options) and are overridden by
the command line. Every user-facing problem ends as one line on stderr and a non-zero exit, not a traceback.

Under ``torchrun`` the commands that train (``train``, ``distill``, ``specialists train``) and ``store build`` join
torchrun's process group (:mod:`darkknowledge.distributed`); rank 0 alone prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

# Before torch loads OpenMP: a thread waiting for work sleeps instead of spinning, so a parallel region does not
# stall when another process holds a core (docs/reliability.md, "CPU threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__  # noqa: E402
from . import distributed, options, reading  # noqa: E402
from .data import available_datasets  # noqa: E402
from .ensemble import COMBINE_RULES  # noqa: E402
from .losses import DEFAULT_DIVERGENCE, DIVERGENCES  # noqa: E402
from .errors import DarkKnowledgeError  # noqa: E402
from .devices import DEFAULT_DEVICE, DEVICE_HELP  # noqa: E402
from .training import DECAY, OPTIMIZERS, SCHEDULES, SELECTION_METRICS, STRATEGIES, TrainConfig  # noqa: E402
from .pretrained import DTYPES  # noqa: E402
from .store_codec import QUANTS  # noqa: E402

EPILOG = "Paper: Hinton, Vinyals & Dean (2015), Distilling the Knowledge in a Neural Network."
DISTRIBUTED_COMMANDS = ("train", "distill", "specialists train", "store build")  # what runs under torchrun
REPRODUCE_DATASETS = {"mnist": ("mnist",), "ensemble": ("fashion-mnist",), "regularizer": ("mnist", "fashion-mnist"),
                      "specialists": ("mnist", "fashion-mnist")}  # what reproduce --download fetches
# A language model on a text corpus trains with a transformer's usual recipe, not with the image defaults of
# TrainConfig: AdamW, a warm-up then a cosine decay, weight decay on the weights alone (not biases and norms'
# gains; LMConfig's 0.1), the epoch kept by validation log-loss. Each option given on the command line or in a
# --config file wins over its entry; _recipe resolves them.
CORPUS_RECIPE = {"optimizer": "adamw", "lr": 3e-3, "schedule": "cosine", "warmup": 0.05, "weight_decay": 0.1,
                 "decay": "weights", "select_by": "log_loss"}
IMAGE_RECIPE = {name: getattr(TrainConfig(), name) for name in CORPUS_RECIPE}
STUDENT_DEFAULT = "mlp:800x2"  # distill's --student when none is given


def _add_data_options(p: argparse.ArgumentParser, default_dataset: str | None = "digits",
                      dataset_help: str = "dataset to train on (default: %(default)s)") -> None:
    g = p.add_argument_group("data")
    # default None, the default applied later: --dataset and --data exclude each other only when both are given
    g.add_argument("--dataset", default=None, choices=available_datasets(),
                   help=dataset_help.replace("%(default)s", str(default_dataset)))
    g.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="your own data instead of --dataset: a .npz (x, y; optional x_test, y_test, classes), a "
                        "folder with x.npy and y.npy (memory-mapped), a folder of one sub-folder of images per class "
                        "(train/ and test/ inside for splits), or a .csv/.parquet table with --label-column")
    g.add_argument("--label-column", default=None, help="a table's label column (default: label)")
    g.add_argument("--text-column", action=_Repeatable, default=None, metavar="NAME", dest="text_column",
                   help="a .csv/.parquet/.jsonl table of text: its text column. With a label column (--label-column, "
                        "default label) it is labelled text for a classifier: twice for sentence pairs (tokenised "
                        "with --tokenizer, cached beside the run; a 'split' column of train/test holds the test split "
                        "out). Without one it is a corpus for a language model (a .jsonl's default: text)")
    g.add_argument("--tokenizer", default=None, metavar="PATH|char|bpe",
                   help="labelled text (--text-column): a Hugging Face tokenizer.json or a model folder holding one "
                        "(distill and evaluate: the teacher's, as its model.json records it); a text corpus: a "
                        "tokenizer.json, or char / bpe trained on the training split (default: bpe)")
    g.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="with --text-column: tokens per text, truncated or padded (default: 128)")
    g.add_argument("--image-size", default=None, metavar="N|HxW",
                   help="resize an image folder's images to N x N or H x W pixels (default: all must share one "
                        "size)")
    g.add_argument("--data-dir", help="folder holding one sub-folder per dataset; default: $DARKKNOWLEDGE_DATA, "
                                      "else the user cache folder")
    g.add_argument("--download", action="store_true", help="fetch missing dataset files (checksums verified)")
    g.add_argument("--val-size", type=float, default=None,
                   help="validation cases cut from the training set (a count, or a fraction < 1; 0 for none); "
                        "default: the dataset's (mnist 10000); distill: the teacher's recorded split (size and "
                        "seed)")
    g.add_argument("--val-seed", type=int, default=0, help="seed of the validation split (default: 0)")


def _add_corpus_options(g) -> None:
    """How a text corpus given as --data is read, split and cut (docs/language-models-cli.md)."""
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="a text corpus: tokens a window, at most the model's positions (default: the model's "
                        "positions, at most 1024)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="a text corpus: seed of the split of whole documents into train/validation/test (10%% "
                        "each for validation and test; default: %(default)s)")


def _recipe_default(name: str) -> str:
    """What --help says an option of the recipe defaults to: the image value and the text corpus's."""
    def shown(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)
    return f"default: {shown(IMAGE_RECIPE[name])} for images and tables, {shown(CORPUS_RECIPE[name])} for a text corpus"


def _add_dtype_option(g, loaded: str, note: str = "") -> None:
    """--dtype: the weights of the Hugging Face folder a command loads (docs/language-models-cli.md)."""
    g.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help=f"{loaded} in this dtype when it is a Hugging Face folder: auto keeps the folder's own "
                        "(config.json's), or float32, bfloat16, float16 (default: %(default)s)" + note)


def _dtype(args: argparse.Namespace) -> str | None:
    return None if args.dtype == "auto" else args.dtype


def _add_training_options(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size (default: %(default)s)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of the optimizer ({_recipe_default('lr')})")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"L2 penalty, decoupled with adamw ({_recipe_default('weight_decay')})")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule: onecycle: a tenth warming up, then cosine to zero; cosine: cosine to "
                        "zero after --warmup; step: halved every tenth of the epochs "
                        f"({_recipe_default('schedule')})")
    g.add_argument("--step-epochs", type=int, default=None, metavar="N",
                   help="with --schedule step: halve every N epochs instead of every tenth of the run, so a shorter "
                        "run follows a longer one's rates (e.g. retraining to an epoch chosen on validation)")
    g.add_argument("--jitter", type=int, default=d.jitter,
                   help="translate inputs randomly by up to N pixels (the paper's teacher: 2; default: 0)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast: faster matmuls on CPUs that have them")
    g.add_argument("--fp16", action="store_true", help="float16 autocast with a gradient scaler (CUDA only)")
    g.add_argument("--device", default=None, help=f"where to train: {DEVICE_HELP} (default: {DEFAULT_DEVICE}, "
                                                  "CUDA when present)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="sgd (with --momentum) or adamw; --lr is the peak rate of either "
                        f"({_recipe_default('optimizer')})")
    g.add_argument("--grad-accumulation", type=int, default=d.grad_accumulation, metavar="N",
                   help="split each step's batch into N micro-batches: the same step in less memory (default: 1)")
    g.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="under torchrun: ddp keeps a whole copy of the model on every rank; fsdp shards its weights, "
                        "gradients and optimizer state over the ranks (FSDP2), for a student too large for one "
                        "device, each transformer block gathered only while it runs. One process ignores it "
                        "(default: %(default)s)")
    g.add_argument("--clip-grad-norm", type=float, default=None, metavar="X",
                   help="clip the gradient's global L2 norm to X before each step (default: no clipping)")
    g.add_argument("--warmup", type=float, default=None, metavar="F",
                   help="the first fraction F of all steps warms the rate up linearly, then --schedule follows "
                        f"(not with onecycle, which warms up already; {_recipe_default('warmup')})")
    g.add_argument("--decay", choices=DECAY, default=None,
                   help="what --weight-decay shrinks: all parameters, or the weights alone (not biases and norms' "
                        f"gains, the usual for transformers) ({_recipe_default('decay')})")
    g.add_argument("--select-by", choices=SELECTION_METRICS, default=None,
                   help="the validation metric that chooses the epoch kept and counts --patience: errors, or "
                        f"log_loss (per case; per token for language models) ({_recipe_default('select_by')})")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after N epochs without a better validation metric (default: train all epochs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")


def _add_distillation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation (§2)")
    g.add_argument("--temperature", "-T", type=float, default=None,
                   help="softmax temperature of the soft targets (the paper's MNIST student: 20)")
    g.add_argument("--soft-weight", type=float, default=1.0, help="weight of the T^2-scaled soft term (default: 1)")
    g.add_argument("--hard-weight", type=float, default=0.0,
                   help="weight of the hard-label cross-entropy, relative to the soft term (default: 0; "
                        "the paper's speech run used 0.5)")
    g.add_argument("--divergence", choices=list(DIVERGENCES), default=DEFAULT_DIVERGENCE,
                   help="how the soft term compares teacher p and student q at T, x T^2: "
                        + "; ".join(f"{name}: {entry.summary}" for name, entry in DIVERGENCES.items()))
    g.add_argument("--beta", type=float, default=None,
                   help="with --divergence jsd: the teacher's weight in [0, 1] (default: 0.5)")
    g.add_argument("--loss-chunk-mb", type=float, default=None,
                   help="working memory of the soft term per chunk of cases, in MB (default: sized for the device: "
                        "a cache's worth on the CPU, a share of the free memory on CUDA); speed only")


def _add_store_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ensemble and soft-target store (§4)")
    g.add_argument("--combine", choices=COMBINE_RULES, default="arithmetic",
                   help="how an ensemble's members are combined: mean of probabilities (the paper's, default), "
                        "normalized geometric mean, or mean of logits (the last two give the same targets)")
    g.add_argument("--store-dir", type=Path, default=None,
                   help="folder of soft-target stores (teacher outputs computed once, keyed by teacher, data and "
                        "settings, reused by later students); default: OUT/../soft-targets")
    g.add_argument("--top-k", type=int, default=None,
                   help="store only the K largest logits per case and a summary of the rest (for many classes)")
    g.add_argument("--store-dtype", choices=("float32", "float16"), default="float32",
                   help="precision of the stored logits (default: %(default)s)")
    g.add_argument("--samples", type=int, default=None, metavar="K",
                   help="store K classes per case drawn from the teacher at T = 1 and their frequencies (an "
                        "unbiased estimate; distils at -T 1 only), for many classes")
    g.add_argument("--head", type=int, default=0, metavar="H",
                   help="with --samples: the H most probable classes kept exact, the K draws made from the rest "
                        "(default: 0)")
    g.add_argument("--quant", choices=QUANTS, default=None,
                   help="with --samples: store the draws compact, class ids in ceil(log2 classes) bits and the "
                        "head's probabilities in a byte each (log8: log p in steps of 1/16 nat; e4m3: fp8), e.g. "
                        "9 bytes a case at --samples 8 --head 2 on the digits' 10 classes, where the sampled store "
                        "took about 75 (default: not packed, the sampled layout)")


def _add_model_options(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument(f"--{role}-option", action=_Repeatable, default=None, metavar="KEY=VALUE", dest=f"{role}_options",
                   help=f"a keyword argument of a --{role} factory (package.module:function, called as "
                        "function(input_shape, num_classes, **options)); repeat it; VALUE is read as JSON when it "
                        "can be (64, 0.5, true, [3, 3]), else as text; in a config file: "
                        f"{role}-options = {{KEY = VALUE}}")


def _model_options(values, role: str) -> dict | None:
    """--ROLE-option KEY=VALUE (repeated) or a config file's table, as a dict of JSON values."""
    if not values:
        return None
    if isinstance(values, dict):
        return dict(values)
    options = {}
    for item in values:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip().isidentifier():
            raise DarkKnowledgeError(f"--{role}-option {item!r} must be KEY=VALUE with KEY a Python name, e.g. "
                                     f"--{role}-option hidden=64")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


class _Repeatable(argparse.Action):
    """``action="append"``, except that the command line replaces a --config file's list instead of extending it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default or not isinstance(current, list):
            current = []
        setattr(namespace, self.dest, [*current, values])


def _named_plans() -> dict:
    """The experiments whose plans have names beyond full and quick, each with its registry."""
    from .experiments import ensemble, lm
    return {"lm": lm.PLANS, "ensemble": ensemble.PLANS}


def _plan_names(experiment: str) -> tuple[str, ...]:
    return tuple(_named_plans().get(experiment, ("full", "quick")))


def _plans_help() -> str:
    """reproduce's --plan names, one line each (from the experiments' registries)."""
    lines = ["plans (--plan NAME; mnist, specialists and regularizer have full and quick):"]
    for experiment, plans in _named_plans().items():
        lines += [f"  {experiment} {name}: {named.about}" for name, named in plans.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkknowledge", epilog=EPILOG,
        description="Knowledge distillation: train a teacher, distil it into a small student, evaluate both.")
    parser.add_argument("--version", action="version", version=f"darkknowledge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (a teacher, or a baseline) on hard labels",
                       description="Train a model on a dataset's training split; saves the model with the best "
                                   "validation error in --out. Data-parallel under 'torchrun --nproc-per-node N -m "
                                   "darkknowledge train ...' (--batch-size is then the global batch).", epilog=EPILOG)
    p.add_argument("--config", type=Path, help="TOML file of options (keys as the long options)")
    p.add_argument("--model", default="mlp:1200x2,dropout=0.5,input_dropout=0.2,max_norm=3.5",
                   help="model spec, e.g. mlp:800x2, mlp:500-300,dropout=0.5, cnn:small (default: the paper's "
                        "teacher, %(default)s); a text corpus: gpt:..., hf:ARCH,key=value,... (vocab_size=N pads "
                        "the output layer) or a language-model folder (a run or a Hugging Face folder)")
    _add_model_options(p, "model")
    p.add_argument("--out", type=Path, help="run directory to write (required)")
    p.add_argument("--members", type=int, default=None,
                   help="train an ensemble of N members differing only in seed (--seed, --seed+1, ...) into "
                        "OUT/member-00, ...; with --resume, finished members are skipped and missing ones trained")
    _add_data_options(p)
    g = p.add_argument_group("text corpus (--data a folder of .txt files, a .jsonl or a table with --text-column: "
                             "a language model, --model gpt:..., hf:... or package.module:factory)")
    _add_corpus_options(g)
    g.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                   help="with --tokenizer bpe: the vocabulary trained (default: %(default)s)")
    _add_training_options(p)

    p = sub.add_parser("distill", help="distil a trained teacher into a student",
                       description="Train a student to match a teacher's soft targets at a temperature (§2) on "
                                   "the teacher's training split. Data-parallel under torchrun, the soft-target store "
                                   "then computed by all ranks (--store-dir must be seen by all).", epilog=EPILOG)
    p.add_argument("--config", type=Path, help="TOML file of options (keys as the long options)")
    p.add_argument("--teacher", type=Path, action=_Repeatable,
                   help="run directory of the teacher; repeat for an ensemble of several runs (required, or "
                        "--ensemble)")
    p.add_argument("--ensemble", type=Path, help="ensemble folder written by 'train --members N', as the teacher")
    p.add_argument("--student", default=STUDENT_DEFAULT, help="student model spec, or package.module:factory "
                                                                "(default: %(default)s); a text corpus: gpt:..., "
                                                                "hf:ARCH,key=value,... or a language-model folder "
                                                                "(a run or a Hugging Face folder, its output layer "
                                                                "may be padded past the teacher's tokenizer)")
    _add_model_options(p, "student")
    p.add_argument("--init-from-teacher", action="store_true",
                   help="start the student from the teacher's weights where names and shapes agree, taking every "
                        "other layer of a teacher twice as deep (DistilBERT's initialisation)")
    p.add_argument("--teacher-device", default=None, help=f"where the teacher runs: {DEVICE_HELP} (default: "
                                                          "the student's --device)")
    p.add_argument("--out", type=Path, help="run directory to write (required)")
    _add_data_options(p, default_dataset=None, dataset_help="dataset to train on (default: the teacher's)")
    g = p.add_argument_group("text corpus (--data a folder of .txt files, a .jsonl or a table with --text-column: "
                             "--teacher a language-model run or Hugging Face folder, --student gpt:..., hf:..., a "
                             "folder or package.module:factory)")
    _add_corpus_options(g)
    g.add_argument("--store", type=Path, default=None, metavar="STORE",
                   help="a text corpus: the teacher's outputs from this store ('store build --out'), which must "
                        "be this teacher's over this corpus and tokenizer (default: the teacher runs online, on "
                        "--teacher-device)")
    g.add_argument("--student-init", default=None, metavar="teacher-layers=I,J,...",
                   help="a text corpus: the student is the teacher's architecture with only these of its layers "
                        "(from 0), each started from that layer's weights, and the teacher's embeddings, final norm "
                        "and output layer (DistilBERT's start; instead of --student), e.g. teacher-layers=0,2,4")
    _add_dtype_option(g, "the teacher's weights", "; a student folder always trains in float32 (--bf16 "
                                                     "autocasts)")
    _add_training_options(p)
    _add_distillation_options(p)
    _add_store_options(p)

    p = sub.add_parser("evaluate", help="print a saved model's (or ensemble's) errors as JSON",
                       description="Evaluate a run directory's model, or an ensemble folder's members combined; "
                                   "prints JSON with errors, accuracy and per-class errors.", epilog=EPILOG)
    p.add_argument("run", type=Path, help="run directory (or its model.json), or an ensemble folder")
    p.add_argument("--combine", choices=COMBINE_RULES, default=None,
                   help="for an ensemble folder: how its members are combined (default: the folder's rule)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="which split to evaluate on: test, the validation split cut from training, or the "
                        "training cases (default: %(default)s)")
    p.add_argument("--jitter", type=int, default=0, help="translate test inputs by up to N pixels (default: 0)")
    p.add_argument("--device", default=None, help=f"where to run the model: {DEVICE_HELP} (default: "
                                                  f"{DEFAULT_DEVICE}, as for training)")
    _add_data_options(p, default_dataset=None,
                      dataset_help="dataset to evaluate on (default: the one the model was trained on)")
    g = p.add_argument_group("text corpus (--data a folder of .txt files, a .jsonl or a table with --text-column: a "
                             "language model evaluated per token)")
    _add_corpus_options(g)
    _add_dtype_option(g, "the model's weights")

    p = sub.add_parser("store", help="teacher outputs computed once, for language models",
                       description="Soft-target stores of a language-model teacher over a text corpus.", epilog=EPILOG)
    store = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    p = store.add_parser("build", help="run a teacher once over a corpus's training windows and store its outputs",
                         description="Run --teacher (a darkknowledge language-model run or a Hugging Face folder) "
                                     "over the training split of --data and store its next-token outputs, keyed to "
                                     "teacher, tokenizer, corpus, context and layout, in a sub-folder of --out. A "
                                     "build killed at any point resumes where it stopped when run again. Prints "
                                     "progress, then bytes per token and tokens/s. Under 'torchrun --nproc-per-node "
                                     "N -m darkknowledge store build ...' each rank runs the teacher over its share "
                                     "of the windows (--out must be seen by all); the store is the one a single "
                                     "process builds.", epilog=EPILOG)
    p.add_argument("--teacher", type=Path, help="the teacher: a language-model run or a Hugging Face folder "
                                                "(required); its tokenizer cuts the corpus")
    p.add_argument("--data", type=Path, metavar="CORPUS",
                   help="the text corpus (required): a folder of .txt files, a .jsonl, or a .csv/.parquet with "
                        "--text-column")
    p.add_argument("--out", type=Path, help="folder of stores to write into (required)")
    p.add_argument("--layout", choices=("dense", "topk", "sampled", "compact"), default="topk",
                   help="what a token's row holds: dense: every logit (2 bytes x vocabulary); topk: the K largest "
                        "and a summary of the rest; sampled: --head exact tokens + --samples drawn at T = 1 "
                        "(distils at T = 1 only; 4 bytes a token kept + 8); compact: the same draws packed, ids in "
                        "ceil(log2 vocabulary) bits and the head's probabilities in 8 bits (--quant), e.g. 66 bytes "
                        "a token at --head 16 --samples 16 and a 4,096-token vocabulary, where sampled takes 136 "
                        "(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="with --layout topk: logits kept a token (default: 32)")
    p.add_argument("--head", type=int, default=0, metavar="H",
                   help="with --layout sampled or compact: the H most probable tokens kept exact (default: 0)")
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help="with --layout sampled or compact: tokens drawn a position from the rest (required there)")
    p.add_argument("--device", default=None, help=f"where the teacher runs: {DEVICE_HELP} (default: "
                                                  f"{DEFAULT_DEVICE}; under torchrun on CUDA, each rank's own GPU)")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="with --layout compact: how the head's probabilities take a byte each: log8, log p below the "
                        "row's most probable token in steps of 1/16 nat over 0..15.9 nats; e4m3, that gap as an fp8 "
                        "e4m3 number (finer within 1 nat, coarser past 2; log8 rebuilt rows closer in our "
                        "measurements) (default: log8)")
    p.add_argument("--text-column", default=None, metavar="NAME",
                   help="the field of a .jsonl (default: text) or the column of a .csv/.parquet table holding each "
                        "document's text")
    _add_corpus_options(p)
    _add_dtype_option(p, "the teacher's weights")

    p = sub.add_parser("demo", help="teacher, baseline and distilled student on the embedded digits, in a minute",
                       description="Train a teacher, a small baseline and a distilled student on scikit-learn's "
                                   "8x8 digits (no download) and print their test errors.", epilog=EPILOG)
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="where the three runs go; finished runs are reused (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the three runs: weights, order of cases, dropout (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars; the stage lines are still printed")

    p = sub.add_parser("reproduce", help="rerun one of the paper's experiments and write a report",
                       description="Train and evaluate every model of an experiment, with checkpoints (a rerun\n"
                                   "reuses finished stages), then write OUT/results.json, OUT/report.md and plots.",
                       epilog=_plans_help() + "\n\n" + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("mnist", "specialists", "ensemble", "regularizer", "lm"),
                   help="mnist: every MNIST result of §3; specialists: §5 on MNIST-100 and Fashion-MNIST; "
                        "ensemble: §4, a 10-member ensemble distilled into one model, on Fashion-MNIST; "
                        "regularizer: §6, 3%% of the data with hard or soft targets, on MNIST and Fashion-MNIST; "
                        "lm: §4 on text, 10 language models distilled into one from a per-token store, on "
                        "Shakespeare")
    p.add_argument("--out", type=Path, help="output folder (default: results/EXPERIMENT, or "
                                                "results/EXPERIMENT-PLAN for a plan other than full)")
    p.add_argument("--plan", metavar="NAME",
                   help="the experiment's settings by name (listed below; default: full); every experiment has full "
                        "and quick, results.json records the name")
    p.add_argument("--quick", action="store_true",
                   help="the same as --plan quick: tiny models on a subset, a smoke test of the whole pipeline, "
                        "seconds (about 10-20 s on a 2-core CPU); its numbers mean nothing")
    p.add_argument("--data-dir", help="folder holding one sub-folder per dataset (default: $DARKKNOWLEDGE_DATA)")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="lm: a folder of UTF-8 .txt files (one document each) in place of the Shakespeare corpus")
    p.add_argument("--download", action="store_true",
                   help="first fetch the experiment's missing dataset files, checksums verified (the image "
                        "datasets; lm's corpus has no download)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars; stage and epoch lines are still printed (and flushed), for the log of "
                        "a background run")
    p.add_argument("--jobs", type=int, default=1,
                   help="lm: train independent runs (the members, each phase's students) N at a time, each in a "
                        "process of one thread, e.g. 2 on a 2-core machine; the numbers do not change "
                        "(default: %(default)s)")
    _add_export_parsers(sub)
    p = sub.add_parser("report", help="one self-contained HTML page (and a Markdown twin) from reproduce folders",
                       description="Gather 'darkknowledge reproduce' output folders into one HTML page with every "
                                   "image embedded (and FILE.md with PNG files beside it): tables beside the "
                                   "paper's, temperature curves, per-class errors, confusion matrices, reliability "
                                   "diagrams and training curves.", epilog=EPILOG)
    p.add_argument("folders", type=Path, nargs="+", metavar="RUN_DIR", help="folders holding results.json")
    p.add_argument("--out", type=Path, help="HTML file to write (required); the Markdown twin goes beside it")
    p.add_argument("--data-dir", help="folder holding one sub-folder per dataset (default: $DARKKNOWLEDGE_DATA)")
    from .specialists.cli import add_specialists_parser  # CLI code of the specialists package
    add_specialists_parser(sub)
    parser.set_defaults(commands=sub.choices)  # the subparsers, for reading a config file's keys
    return parser


def _add_export_parsers(sub) -> None:
    """``export`` and ``bench``: ship a trained model, and measure what shipping it costs."""
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript, checked, with a model card; "
                                      "a language model's as a Hugging Face folder",
                       description="Export a run directory's model (or an ensemble folder, as one graph) with a "
                                   "dynamic batch size; check it against PyTorch on the test set; write "
                                   "FILE.model_card.md beside it. Inputs: float32 [batch, H, W] in [0, 1] "
                                   "(uint8 / 255). --format hf writes a language-model run's hf: model as a "
                                   "Hugging Face folder (save_pretrained + tokenizer), loaded back by transformers "
                                   "and checked to give the same logits.", epilog=EPILOG)
    p.add_argument("run", type=Path, help="run directory (or its model.json), or an ensemble folder")
    p.add_argument("--format", default="onnx", metavar="{onnx,torchscript,hf}",
                   help="file format: onnx or torchscript, or hf: a Hugging Face folder (config.json, "
                        "model.safetensors, tokenizer.json) of a language-model or text-classifier run (default: "
                        "%(default)s)")
    p.add_argument("--out", type=Path, help="file to write, e.g. student.onnx (required)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest |logit difference| from PyTorch accepted on the test set (default: %(default)g)")
    p.add_argument("--threads", type=int, default=1, help="threads for the check and the quick speed measurement "
                                                          "(default: %(default)s)")
    p.add_argument("--no-card", action="store_true", help="skip the model card (and its speed measurement)")
    p.add_argument("--data-dir", help="folder holding one sub-folder per dataset (default: $DARKKNOWLEDGE_DATA)")
    p.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="test inputs from these files (as for train --data) when the run records none, or "
                        "instead of its own")

    p = sub.add_parser("generate", help="sample text from a language-model run",
                       description="Sample tokens after a prompt from a run made by 'reproduce lm' (its model and "
                                   "its tokenizer, checked by SHA-256).", epilog=EPILOG)
    p.add_argument("run", type=Path, metavar="RUN", help="a language-model run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to sample (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the sampling: the same seed, the same text (default: %(default)s)")

    p = sub.add_parser("bench", help="size, FLOPs, accuracy, latency and throughput of runs, side by side",
                       description="For each run: parameters, size on disk, FLOPs per example, test errors, batch-1 "
                                   "latency (median, p99) and large-batch throughput in PyTorch and onnxruntime. "
                                   "Language-model runs and Hugging Face folders: prompt and greedy decode tokens "
                                   "a second at batch 1. Prints a Markdown table; --json saves every number.",
                       epilog=EPILOG)
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="run directories or ensemble folders; or language-model runs and Hugging Face folders")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=1, help="threads for both runtimes (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1024, help="batch for throughput (default: %(default)s)")
    p.add_argument("--calls", type=int, default=300, help="batch-1 calls timed (default: %(default)s)")
    p.add_argument("--no-onnx", action="store_true", help="time PyTorch only")
    p.add_argument("--data-dir", help="folder holding one sub-folder per dataset (default: $DARKKNOWLEDGE_DATA)")
    p.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="test inputs from these files (as for train --data) when a run records none")


def _run_export_or_bench(args: argparse.Namespace) -> int:
    if args.command == "export":
        from .deploy import export_run
        from .export import check_format
        from .hf_export import HF_FORMAT, export_hf
        from .pretrained import is_language_model
        if args.format == HF_FORMAT and is_language_model(args.run):  # a classifier's goes through export_run
            if args.out is None:
                raise DarkKnowledgeError("export --format hf needs --out DIR, e.g. --out student-hf")
            written = export_hf(args.run, args.out, atol=args.atol)
            print(f"wrote {written['out']} (a Hugging Face {written['architecture']} folder); max |logit difference| "
                  f"after loading it with transformers: {written['max_abs_difference']:.3g} (atol {args.atol:g})")
            return 0
        check_format(args.format)
        if args.out is None:
            raise DarkKnowledgeError("export needs --out FILE, e.g. --out student.onnx")
        result = export_run(args.run, args.format, args.out, args.data_dir, atol=args.atol, card=not args.no_card,
                            command="darkknowledge " + " ".join(args.argv), threads=args.threads,
                            data_path=args.data)
        print(f"wrote {result.out}" + (f" and {result.card}" if result.card else "") + f"; {result.parity.describe()}")
        return 0
    from .bench import BenchConfig, bench_runs, format_table
    from .checkpoint import write_json
    from .lm_bench import bench_causal_lms, format_lm_table
    from .pretrained import is_language_model
    missing = [run for run in args.runs if not Path(run).exists()]
    if missing:  # else a mistyped run reads as one of another kind than the others
        raise DarkKnowledgeError(f"{missing[0]} does not exist; give run folders (or Hugging Face folders) to bench")
    language_models = [is_language_model(run) for run in args.runs]
    if any(language_models) and not all(language_models):
        raise DarkKnowledgeError("bench compares language models with language models and image models with image "
                                 "models; give runs of one kind")
    if all(language_models):  # prompt and decode tokens a second
        result = bench_causal_lms(args.runs, threads=args.threads, log=lambda line: print(line, file=sys.stderr))
        format_table = format_lm_table
    else:
        config = BenchConfig(threads=args.threads, batch_size=args.batch_size, latency_calls=args.calls,
                             onnx=not args.no_onnx)
        result = bench_runs(args.runs, config, args.data_dir, log=lambda line: print(line, file=sys.stderr),
                            data_path=args.data)
    result["command"] = "darkknowledge " + " ".join(args.argv)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse twice: once to find --config, then with the file's values as defaults under the command line."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    try:
        values = tomllib.loads(reading.read_text(args.config, "config file", reading.CONFIG_LIMIT))
    except FileNotFoundError:
        raise DarkKnowledgeError(f"config file {args.config} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DarkKnowledgeError(f"config file {args.config} is not valid TOML: {e}") from None
    subparser = args.commands[args.command]
    known = set(vars(args)) - {"command", "commands", "config"}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DarkKnowledgeError(f"config file {args.config}: unknown option(s) {', '.join(unknown)}; "
                                 f"allowed: {', '.join(sorted(known))}")
    subparser.set_defaults(**values)
    return parser.parse_args(argv)


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise DarkKnowledgeError(f"{args.command} needs --{name.replace('_', '-')} "
                                     "(on the command line or in the --config file)")


def _image_size(text) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = str(text).lower().split("x")
    try:
        size = tuple(int(p) for p in parts) * (2 if len(parts) == 1 else 1)
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise DarkKnowledgeError(f"--image-size {text!r} must be N or HxW with positive whole numbers, e.g. 32 or "
                                 "28x56")
    return size


def _data_choice(args: argparse.Namespace, default: str | dict | None = None):
    """--dataset NAME or --data PATH (not both); without either, ``default``: a dataset name, or what a teacher's
    model.json says it was trained on (``jobs.teacher_data``)."""
    from .jobs import DataChoice
    val_size = args.val_size
    if val_size is not None and val_size >= 1:
        if val_size != int(val_size):
            raise DarkKnowledgeError(f"--val-size must be a whole count or a fraction below 1, got {val_size}")
        val_size = int(val_size)
    if args.dataset is not None and args.data is not None:
        raise DarkKnowledgeError("give --dataset NAME or --data PATH, not both")
    path, label_column, image_size = args.data, args.label_column, _image_size(args.image_size)
    dataset = args.dataset
    if dataset is None and path is None:
        if isinstance(default, dict):  # a teacher's data
            files = default.get("data") or {}
            dataset, path = (None, files["path"]) if files else (default.get("dataset"), None)
            label_column = label_column or files.get("label_column")
            image_size = image_size or (tuple(files["image_size"]) if files.get("image_size") else None)
            if dataset is None and path is None:
                raise DarkKnowledgeError("the teacher's model.json does not say which data it was trained on (a "
                                         "folder written by fit alone); give --dataset NAME or --data PATH")
        else:
            dataset = default
    if path is None and (args.label_column is not None or args.image_size is not None):
        raise DarkKnowledgeError("--label-column and --image-size are for --data PATH; drop them or give --data")
    text = _text_choice(args, default.get("data") or {} if isinstance(default, dict) and args.data is None else {})
    return DataChoice(dataset, args.data_dir, args.download, val_size, args.val_seed, path=None if path is None
                      else str(path), label_column=label_column, image_size=image_size, **text)


def _text_choice(args: argparse.Namespace, recorded: dict) -> dict:
    """--text-column, --tokenizer and --max-length (a teacher's recorded ones where not given) as DataChoice
    fields."""
    from .jobs import text_options
    columns = args.text_column
    columns = [columns] if isinstance(columns, str) else columns
    given = {"text_columns": tuple(columns) if columns else None,
             "tokenizer": None if args.tokenizer is None else str(args.tokenizer), "max_length": args.max_length}
    text = {**text_options(recorded), **{k: v for k, v in given.items() if v is not None}}
    if not text.get("text_columns") and (args.tokenizer is not None or args.max_length is not None):
        raise DarkKnowledgeError("--tokenizer and --max-length are for text: give --data TABLE --text-column NAME")
    if text.get("text_columns") and args.data is None and not recorded:
        raise DarkKnowledgeError("--text-column needs --data TABLE (a .csv, .parquet or .jsonl file)")
    return text


def _is_corpus(args: argparse.Namespace) -> bool:
    """Whether --data is a text corpus (decided by what it holds: .txt files, a .jsonl, a table's text column)."""
    from .data.text import is_corpus
    return args.data is not None and is_corpus(args.data, _corpus_column(args), args.label_column)


def _corpus_column(args: argparse.Namespace) -> str | None:
    """A corpus's one text column (labelled text may have two)."""
    columns = [args.text_column] if isinstance(args.text_column, str) else args.text_column or [None]
    if len(columns) > 1:
        raise DarkKnowledgeError("a text corpus has one --text-column (two are for labelled sentence pairs)")
    return columns[0]


def _corpus(args: argparse.Namespace):
    from .lm_jobs import Corpus
    if args.data is None:
        raise DarkKnowledgeError(f"{args.command} needs --data CORPUS (a folder of .txt files, a .jsonl, or a "
                                 ".csv/.parquet with --text-column)")
    return Corpus(str(args.data), _corpus_column(args), args.context, seed=args.split_seed)


def _run_language_model(args: argparse.Namespace, say) -> None:
    """train or distill on a text corpus: a language model on the one loop (lm_jobs.lm_run)."""
    from .lm_jobs import check_language_model_spec, corpus_tokenizer, lm_run
    from .models import count_parameters
    _require(args, "out")
    corpus, config = _corpus(args), _train_config(args)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if distributed.current().is_main else \
        (lambda _: None)
    if args.command == "train":
        if not Path(args.model).expanduser().is_dir():  # a folder's model is read with the run's tokenizer
            check_language_model_spec(args.model)  # before a tokenizer is trained
        tokenizer = corpus_tokenizer(corpus, args.tokenizer or "bpe", args.vocab_size)
        model, meta = lm_run(args.model, corpus, config, args.out, args.resume, tokenizer=tokenizer,
                             device=args.device, log=log)
    else:
        teachers = _teachers(args)
        _require(args, "temperature")
        # a corpus store's layout is chosen once, when it is built; distill reads whichever store --store names
        given = [flag for flag, value in (("--top-k", args.top_k), ("--samples", args.samples), ("--head", args.head),
                                          ("--quant", args.quant)) if value]
        if given:
            raise DarkKnowledgeError(f"{', '.join(given)}: on a text corpus the store's layout is chosen by "
                                     "'store build --layout ...'; build the store with them and give it to --store")
        if len(teachers) != 1:
            raise DarkKnowledgeError("distill --data CORPUS takes one --teacher (a language-model run or a Hugging "
                                     "Face folder)")
        layers = None
        if args.student_init is not None:
            from .pretrained import parse_student_init
            layers = parse_student_init(args.student_init)
            if args.student != STUDENT_DEFAULT:
                raise DarkKnowledgeError("give --student-init teacher-layers=... (a student of the teacher's "
                                         "architecture) or --student, not both")
        model, meta = lm_run(args.student, corpus, config, args.out, args.resume, teacher=teachers[0],
                             store=args.store, device=args.device, teacher_device=args.teacher_device,
                             student_init=layers, dtype=_dtype(args),
                             objective={"temperature": args.temperature, "soft_weight": args.soft_weight,
                                        "hard_weight": args.hard_weight, "divergence": args.divergence,
                                        "beta": args.beta}, log=log)
    best = meta["history"][meta["best_epoch"] - 1]
    say(f"saved {count_parameters(model):,}-parameter language model to {args.out}, best validation log-loss "
        f"{best['val_log_loss']:.4f} at epoch {meta['best_epoch']}")


def _run_store(args: argparse.Namespace, say) -> None:
    from .lm_jobs import build_store
    if args.store_command is None:
        raise DarkKnowledgeError("store needs a subcommand: store build --teacher T --data CORPUS --out STORE")
    _require(args, "teacher", "out")
    # Under torchrun every rank builds its share of the windows; rank 0 alone shows progress and says what it did.
    main_rank = distributed.current().is_main
    store, report = build_store(args.teacher, _corpus(args), args.out, args.layout, top_k=args.top_k,
                                head=args.head, samples=args.samples, quant=args.quant, device=args.device,
                                dtype=_dtype(args),
                                log=(lambda line: print(line, file=sys.stderr)) if main_rank else (lambda _: None),
                                on_chunk=None if main_rank else (lambda done, total: None))
    say(f"store {report['layout']} of {report['tokens']:,} tokens in {store.path}: "
        f"{report['bytes_per_token']:g} bytes per token, {report['tokens_per_second']:,.0f} tokens/s")


def _recipe(args: argparse.Namespace) -> dict:
    """The recipe's settings of this run: each option given, else :data:`CORPUS_RECIPE`'s for a text corpus and
    the image defaults otherwise. The recipe's warm-up is for a schedule without its own: none with onecycle."""
    recipe = CORPUS_RECIPE if _is_corpus(args) else IMAGE_RECIPE
    chosen = {name: recipe[name] if getattr(args, name) is None else getattr(args, name) for name in recipe}
    if args.warmup is None and chosen["schedule"] == "onecycle":
        chosen["warmup"] = 0.0
    return chosen


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, momentum=args.momentum, jitter=args.jitter,
                       bf16=args.bf16, seed=args.seed, patience=args.patience, step_epochs=args.step_epochs,
                       progress=not args.no_progress, grad_accumulation=args.grad_accumulation,
                       clip_grad_norm=args.clip_grad_norm, fp16=args.fp16, strategy=args.strategy, **_recipe(args))


def _summary(model, result, out: Path) -> str:
    from .models import count_parameters
    best = f", best validation errors {result.best_val_errors} at epoch {result.best_epoch}" \
        if result.best_val_errors is not None else ""
    return f"saved {count_parameters(model):,}-parameter model to {out}{best} ({result.seconds:.0f}s)"


def _teachers(args: argparse.Namespace) -> list[Path]:
    """--teacher (repeatable; a config file may give one path or a list) or --ensemble, not both."""
    teachers = args.teacher
    if isinstance(teachers, (str, Path)):
        teachers = [teachers]
    teachers = [Path(t) for t in teachers or []]
    if teachers and args.ensemble is not None:
        raise DarkKnowledgeError("give --teacher (one or more runs) or --ensemble FOLDER, not both")
    if args.ensemble is not None:
        return [Path(args.ensemble)]
    if not teachers:
        raise DarkKnowledgeError("distill needs --teacher RUN (repeat it for an ensemble) or --ensemble FOLDER "
                                 "(on the command line or in the --config file)")
    return teachers


def _command_name(args: argparse.Namespace) -> str:
    """The command with its subcommand, as the user typed it: ``train``, ``specialists train``, ``store build``."""
    return " ".join(filter(None, (args.command, getattr(args, "specialists_command", None),
                                  getattr(args, "store_command", None))))


def _refuse_foreign_destinations(args: argparse.Namespace) -> None:
    """Before any work: refuse an output path inside a run, store or experiment folder this command does not write
    (``destinations.py``). A reproduction checks its own folder (``experiments/folder.py``)."""
    from .destinations import EXPERIMENT, RUN, refuse_foreign_destination
    command = _command_name(args)
    files = {"export": "out", "bench": "json", "report": "out", "specialists evaluate": "json"}
    if command in files and getattr(args, files[command]) is not None:  # an export's model card, a report's
        # Markdown twin and images go beside the file named: into the same folder
        refuse_foreign_destination(getattr(args, files[command]), f"{command} --{files[command]}")
    elif command in ("train", "distill", "specialists cluster") and args.out is not None:
        # a run folder, which may lie in an experiment folder (as its stages' runs do) or in another run folder
        # (as an ensemble's members do)
        refuse_foreign_destination(args.out, f"{command} --out", makes=RUN, inside=(RUN, EXPERIMENT))
    elif command == "store build" and args.out is not None:  # a folder of stores (each in its key's sub-folder)
        refuse_foreign_destination(args.out, "store build --out", inside=(EXPERIMENT,))
    elif command == "demo":  # a folder of three runs
        refuse_foreign_destination(args.out, "demo --out")


def run(args: argparse.Namespace) -> int:
    from . import jobs
    say = print if distributed.current().is_main else (lambda *_: None)
    _refuse_foreign_destinations(args)
    if args.command == "reproduce" and args.data is not None and args.experiment != "lm":
        raise DarkKnowledgeError(f"reproduce {args.experiment} --data: --data is lm's (a folder of .txt files); "
                                 "the image experiments read their datasets from --data-dir")
    if args.command == "reproduce" and args.plan is not None:  # refused before any folder is made
        from .experiments.plans import check_name
        check_name(_plan_names(args.experiment), args.plan, args.quick, args.experiment)
    if args.command == "reproduce" and args.jobs != 1 and args.experiment != "lm":
        raise DarkKnowledgeError(f"reproduce {args.experiment} --jobs: --jobs is lm's; the image experiments "
                                 "train one stage at a time")
    if args.command == "reproduce" and args.download:
        from .data import load_dataset
        if args.experiment not in REPRODUCE_DATASETS:
            raise DarkKnowledgeError(f"reproduce {args.experiment} --download: its data has no download; put the "
                                     "files in --data-dir (or $DARKKNOWLEDGE_DATA) and run it without --download")
        for name in REPRODUCE_DATASETS[args.experiment]:
            load_dataset(name, args.data_dir, download=True)
    if args.command in ("distill", "evaluate") and (getattr(args, "student_init", None) is not None or
                                                    args.dtype != "auto") and not _is_corpus(args):
        raise DarkKnowledgeError(f"--student-init and --dtype are for a language model on a text corpus (--data "
                                 f"CORPUS), not for {args.command} of an image or table model (distill "
                                 "--init-from-teacher starts such a student from its teacher)")
    if args.command == "train" and args.members is not None:
        _require(args, "out")
        done = jobs.train_ensemble(args.model, _data_choice(args, "digits"), _train_config(args), args.out,
                                   args.members, args.resume, options=_model_options(args.model_options, "model"),
                                   device=args.device)
        say(f"saved an ensemble of {args.members} members to {args.out} ({len(done.trained)} trained now, "
              f"{len(done.skipped)} already finished); use it with 'distill --ensemble {args.out}'")
    elif args.command in ("train", "distill") and _is_corpus(args):
        _run_language_model(args, say)
    elif args.command == "train":
        _require(args, "out")
        model, result = jobs.train_run(args.model, _data_choice(args, "digits"), _train_config(args), args.out,
                                       args.resume, options=_model_options(args.model_options, "model"),
                                       device=args.device)
        say(_summary(model, result, args.out))
    elif args.command == "distill":
        teachers = _teachers(args)
        _require(args, "out", "temperature")
        if args.quant is not None and args.samples is None:
            raise DarkKnowledgeError("--quant packs a sampled store's draws: give --samples K with it (or drop "
                                     "--quant)")
        model, result = jobs.distill_run(
            teachers, args.student, _data_choice(args, jobs.teacher_data(teachers)), _train_config(args),
            args.temperature, args.soft_weight, args.hard_weight, args.out, args.resume, combine=args.combine,
            store_dir=args.store_dir or Path(args.out).parent / "soft-targets", top_k=args.top_k,
            samples=args.samples, head=args.head, compact=args.quant, store_dtype=args.store_dtype,
            options=_model_options(args.student_options, "student"),
            device=args.device, teacher_device=args.teacher_device, divergence=args.divergence, beta=args.beta,
            loss_chunk_mb=args.loss_chunk_mb, init_from_teacher=args.init_from_teacher)
        say(_summary(model, result, args.out))
    elif args.command == "evaluate" and _is_corpus(args):
        from .lm_jobs import evaluate_lm_run
        print(json.dumps(evaluate_lm_run(args.run, _corpus(args), args.split, args.device, _dtype(args)),
                         indent=2))
    elif args.command == "store":
        _run_store(args, say)
    elif args.command == "evaluate":
        data = _data_choice(args) if args.dataset or args.data else None
        print(json.dumps(jobs.evaluate_run(args.run, data, args.split, args.jitter, args.combine, args.device),
                         indent=2))
    elif args.command == "specialists":
        from .specialists.cli import run_specialists
        return run_specialists(args)
    elif args.command == "reproduce":
        if args.experiment == "ensemble":
            from .experiments.ensemble import reproduce_ensemble as reproduce
        elif args.experiment == "lm":
            from .experiments.lm import reproduce_lm as reproduce
        elif args.experiment == "regularizer":
            from .experiments.regularizer import reproduce_regularizer as reproduce
        elif args.experiment == "specialists":
            from .experiments.specialists import reproduce_specialists as reproduce
        else:
            from .experiments.mnist import reproduce_mnist as reproduce
        plan = args.plan or ("quick" if args.quick else "full")
        out = args.out or Path("results") / (args.experiment + ("" if plan == "full" else f"-{plan}"))
        command = "darkknowledge " + " ".join(args.argv)
        extra = {}
        if args.experiment in _named_plans():
            extra["plan"] = args.plan
        if args.experiment == "lm":
            extra["jobs"] = args.jobs
            if args.data is not None:  # lm on the user's own text (checked to be lm above)
                extra["corpus"] = str(args.data)
        reproduce(out, quick=plan == "quick", data_dir=args.data_dir, progress=not args.no_progress,
                  command=command, log=lambda line: print(line, flush=True), **extra)
        print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    elif args.command == "generate":
        from .checkpoint import resolve_run_dir
        from .language_model import generate, load_language_model, load_run_tokenizer
        model, meta = load_language_model(args.run)
        print(args.prompt + generate(model, load_run_tokenizer(resolve_run_dir(args.run), meta),
                                     args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
    elif args.command == "demo":
        from .experiments.demo import run_demo
        print(run_demo(args.out, seed=args.seed, progress=not args.no_progress))
    elif args.command == "report":
        from .html_report import run_report
        return run_report(args)
    elif args.command in ("export", "bench"):
        return _run_export_or_bench(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options.install(parser)
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # anywhere on the line: also show the traceback of the user's code behind an error
    argv = [a for a in argv if a != "--debug"]
    try:
        args = _apply_config_file(parser, argv)
        options.check(parser, args)  # command line and config file alike
        args.argv = argv  # recorded in reports as the command that made them
        if args.command is None:
            parser.print_help()
            return 2
        command = _command_name(args)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and command not in DISTRIBUTED_COMMANDS:
            if int(os.environ.get("RANK", 0)) != 0:
                return 1  # rank 0 says why, once
            raise DarkKnowledgeError(f"'{command}' runs as one process: start it without torchrun (under torchrun: "
                                     f"{', '.join(DISTRIBUTED_COMMANDS)})")
        if "OMP_NUM_THREADS" not in os.environ:
            # One intra-op thread unless asked for more: the same model on any machine, and no collapse when the
            # cores are shared (docs/reliability.md, "CPU threads")
            import torch
            torch.set_num_threads(1)
        if command in DISTRIBUTED_COMMANDS:
            distributed.init_from_env(getattr(args, "device", None))  # nccl only for a job on CUDA
        code = run(args)
        distributed.shutdown()
        return code
    except DarkKnowledgeError as e:
        if debug and e.__cause__ is not None:
            traceback.print_exception(e.__cause__)
        print(f"darkknowledge: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, options.UsageError) else 1
    except OSError as e:  # disk full, permission denied, ...: say which file
        print(f"darkknowledge: error: {e.strerror or e} ({e.filename})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("darkknowledge: interrupted; finished epochs are saved: rerun with --resume to continue",
              file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(finished=False)  # after an error (after success: done above)

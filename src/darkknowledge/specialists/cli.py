"""``darkknowledge specialists cluster|train|evaluate`` (``reproduce specialists`` is the main CLI's, with the
other reproductions).

CLI code only: it parses and calls :mod:`darkknowledge.specialists.jobs`; the library never imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..devices import DEFAULT_DEVICE, DEVICE_HELP
from ..distributed import current
from ..errors import DarkKnowledgeError
from ..training import SCHEDULES, TrainConfig
from .combine import DEFAULT_TOL
from .specialist import SpecialistConfig

EPILOG = "Paper: Hinton, Vinyals & Dean (2015), Distilling the Knowledge in a Neural Network, §5."


def add_specialists_parser(sub) -> None:
    """Add ``specialists`` with its three sub-commands to the main parser's sub-parsers."""
    top = sub.add_parser("specialists", help="specialists for confusable classes (§5): cluster, train, evaluate",
                         description="Find confusable class subsets of a trained generalist, train a specialist "
                                     "(subset + dustbin class) for each, and evaluate generalist + specialists.",
                         epilog=EPILOG)
    steps = top.add_subparsers(dest="specialists_command", metavar="STEP")

    p = steps.add_parser("cluster", help="class subsets from the generalist's predictions; writes OUT/subsets.json",
                         description="Cluster the classes with online k-means on the columns of the covariance "
                                     "(or correlation) matrix of the generalist's predicted probabilities over its "
                                     "training split (no labels), or of its confusion matrix on its validation "
                                     "split.",
                         epilog=EPILOG)
    p.add_argument("--generalist", type=Path, required=True, help="run directory of the generalist")
    p.add_argument("--out", type=Path, required=True, help="specialists folder to write subsets.json into")
    p.add_argument("--clusters", type=int, required=True, help="number of k-means clusters")
    p.add_argument("--method", choices=("covariance", "correlation", "confusion"), default="covariance",
                   help="covariance of predictions (§5, no labels), the same scaled to correlations (more robust), "
                        "or confusion matrix on the validation split (default: %(default)s)")
    p.add_argument("--overlap", type=int, default=0,
                   help="each class also joins its N next-nearest clusters (default: %(default)s)")
    p.add_argument("--overlap-ratio", type=float, default=None,
                   help="... only those within this multiple of its distance to its own cluster's centre")
    p.add_argument("--min-size", type=int, default=2,
                   help="drop clusters with fewer classes; their classes get no specialist (default: %(default)s)")
    p.add_argument("--raw-columns", action="store_true",
                   help="cluster the matrix's columns as they are (default: each column with its diagonal entry "
                        "removed and scaled to unit length)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")
    p.add_argument("--data-dir", help="folder holding one sub-folder per dataset (default: $DARKKNOWLEDGE_DATA)")

    d = SpecialistConfig()
    t = d.training
    p = steps.add_parser("train", help="train one, some or all specialists of a folder",
                         description="Train specialists from the generalist named in FOLDER/subsets.json, each "
                                     "into FOLDER/specialist-NN. Separate processes can train different "
                                     "--index values at the same time; under torchrun (--nproc-per-node N) the "
                                     "ranks share the chosen specialists, balanced by their subsets' sizes.",
                         epilog=EPILOG)
    p.add_argument("folder", type=Path, help="specialists folder (holds subsets.json)")
    p.add_argument("--index", default="all", help="'all', one index or a list such as 0,2,5-7 (default: all)")
    p.add_argument("--all", action="store_true", help="every specialist (the same as --index all)")
    p.add_argument("--epochs", type=int, default=t.epochs, help="epochs; one epoch passes over the subset's cases "
                                                                "once (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=t.batch_size,
                   help="minibatch size, half subset and half other cases (default: %(default)s)")
    p.add_argument("--lr", type=float, default=t.lr, help="peak learning rate of SGD (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=t.momentum, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay, help="L2 penalty (default: %(default)s)")
    p.add_argument("--schedule", choices=SCHEDULES, default=t.schedule,
                   help="learning-rate schedule (default: %(default)s)")
    p.add_argument("--jitter", type=int, default=t.jitter, help="random shifts of up to N pixels (default: 0)")
    p.add_argument("--seed", type=int, default=t.seed,
                   help="random seed: order of cases, dropout (default: %(default)s)")
    p.add_argument("--patience", type=int, default=None, help="stop after N epochs without a lower validation loss")
    p.add_argument("--subset-fraction", type=float, default=d.subset_fraction,
                   help="share of each batch drawn from the specialist's subset (§5: %(default)s)")
    p.add_argument("--no-calibration", action="store_true",
                   help="start the dustbin row from the mean of the other classes' rows only, without fitting it "
                        "to the generalist first")
    p.add_argument("--temperature", "-T", type=float, default=None,
                   help="train on the generalist's soft targets at this temperature (§6.1) instead of labels")
    p.add_argument("--soft-weight", type=float, default=d.soft_weight, help="with -T (default: %(default)s)")
    p.add_argument("--hard-weight", type=float, default=d.hard_weight,
                   help="with -T: weight of the label term (default: %(default)s)")
    p.add_argument("--device", default=None, help=f"where the specialists train: {DEVICE_HELP} (default: "
                                                  f"{DEFAULT_DEVICE})")
    p.add_argument("--resume", action="store_true", help="continue interrupted specialists and skip finished ones")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    p.add_argument("--data-dir", help="folder holding one sub-folder per dataset (default: $DARKKNOWLEDGE_DATA)")

    p = steps.add_parser("evaluate", help="generalist alone vs generalist + specialists; prints JSON",
                         description="Combine the generalist with its active specialists on every case of a split "
                                     "and print Table 3 and Table 4 of the paper as JSON.", epilog=EPILOG)
    p.add_argument("folder", type=Path, help="specialists folder")
    p.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="which split to evaluate on (default: %(default)s)")
    p.add_argument("--top-n", type=int, default=1,
                   help="the generalist's N most probable classes pick the active specialists (default: 1)")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help="stop the combination when ||dL/dz||_1 <= TOL for every case (default: %(default)g)")
    p.add_argument("--json", type=Path, help="also write the result to this file")
    p.add_argument("--data-dir", help="folder holding one sub-folder per dataset (default: $DARKKNOWLEDGE_DATA)")
    top.set_defaults(specialists_parser=top)


def run_specialists(args: argparse.Namespace) -> int:
    from . import jobs
    step = getattr(args, "specialists_command", None)
    if step is None:
        args.specialists_parser.print_help()
        return 2
    if step == "cluster":
        subsets = jobs.cluster_run(args.generalist, args.out, args.clusters, args.method, args.overlap,
                                   args.overlap_ratio, args.min_size, args.seed, args.data_dir,
                                   normalize=not args.raw_columns)
        print("\n".join(f"subset {line}" for line in subsets.describe()))
        print(f"wrote {args.out / jobs.SUBSETS_FILE} ({len(subsets)} subsets)")
    elif step == "train":
        subsets = jobs.read_subsets(args.folder)
        if args.all and args.index != "all":
            raise DarkKnowledgeError(f"give --all or --index {args.index}, not both")
        indices = jobs.parse_indices(args.index, len(subsets))
        workers = current()
        training = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, schedule=args.schedule, jitter=args.jitter,
                               seed=args.seed, patience=args.patience, progress=False)
        config = SpecialistConfig(training, subset_fraction=args.subset_fraction, temperature=args.temperature,
                                  soft_weight=args.soft_weight, hard_weight=args.hard_weight,
                                  calibrate_dustbin=not args.no_calibration)
        quiet = (lambda _: None) if args.no_progress else (lambda line: print(line, file=sys.stderr))

        def report(index: int, done: dict) -> None:  # printed as soon as each specialist is done
            names = " ".join(subsets.class_names[c] for c in done["subset"])
            by = f" by rank {workers.rank}" if workers.distributed else ""
            print(f"specialist {index} ({names}): best epoch {done['best_epoch']}, dustbin offset "
                  f"{done['dustbin_offset']:+.3f}, {done['seconds']:.1f}s, saved to "
                  f"{jobs.specialist_dir(args.folder, index)}{by}", flush=True)

        done = jobs.train_specialists(args.folder, indices, config, args.resume, args.data_dir, quiet,
                                      on_done=report, device=args.device)
        if workers.distributed and workers.is_main:
            shares = {rank: [i for i, row in done.items() if row["rank"] == rank] for rank in range(workers.world_size)}
            print(f"trained {len(done)} specialists on {workers.world_size} ranks: "
                  + "; ".join(f"rank {rank}: {share}" for rank, share in shares.items()), flush=True)
    elif step == "evaluate":
        result = jobs.evaluate_specialists(args.folder, args.split, args.top_n, args.tol, args.data_dir)
        print(json.dumps(result, indent=2))
        if args.json:
            from ..checkpoint import write_json
            write_json(args.json, result)
    return 0


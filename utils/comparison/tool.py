"""The paper's comparison under one protocol that gives every method the same chance:
OPQN, OPQN-l2q, DPQ, GPQ and DCDH at one code length on one dataset.

Protocol (``utils/comparison/plan.py``):

1. **Validation, never test, for choices.** ``--val-per-identity`` training images of every
   identity are held out as queries, the rest of the training split is the gallery
   (``data/validation_split.py``: a folder of symbolic links under ``--out``, leak-checked).
2. **Learning rate per method, equal budget.** Every method trains ``--tune-epochs`` epochs
   on the validation gallery at every lr of its optimiser's grid (``--sgd-lrs`` or
   ``--adam-lrs``, plus its default and its authors' lr from its spec in ``models/methods/``);
   the lr with the highest validation mAP is chosen. Epochs, schedule, batch, data and
   backbone are the same for every method.
3. **Seeds.** The chosen lr is retrained on the full training split with ``--seeds S``
   seeds; each final model is evaluated once on the test split (the monitoring evaluation
   is off in final runs). Test mAP and P@k are reported as mean ± sd, and OPQN's paired
   difference to every method with its sd over the seeds.
4. **Did not train.** A method whose loss fell less than ``--min-loss-drop`` or whose
   lowest cross-entropy stayed at or above ``(1 - --ce-margin)·log C`` in any seed is
   marked "did not train" and not ranked.

Everything runs in float32 (``--amp off``) unless ``--amp`` is given after ``--``. Outputs
under ``--out``, with ``<tag>`` = ``<dataset>[_cross]_<bits>bits``:

* ``compare_<tag>.md``: the table; ``compare_<tag>.json``: every run and the summary;
* ``compare_<tag>_pr.png``: the PR curves (mean over seeds); ``compare_<tag>_loss.png``:
  every method's training loss per epoch (chosen lr, first seed);
  ``compare_<tag>_val.png``: validation mAP per epoch of every lr tried;
* ``runs_<tag>/``: one JSON record per finished run (``records/``), checkpoints, logs,
  results and the validation split. An interrupted comparison continues where it stopped
  when the same command is run again: finished runs are reused, never replaced; a record
  made with other settings is an error.

Each run is an ``opqn_main.py`` process, so a run is exactly what a user gets from the
command line. Examples::

    python -m utils.comparison --dataset synthface --len 36
    python -m utils.comparison --dataset synthface --len 36 --cross --seeds 3

Product-quantization methods use ``--num`` codebooks (default 6) of ``2**(len/num)`` words;
DCDH uses ``--len`` bits. Extra ``opqn_main.py`` flags go after ``--``.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import replace
from typing import Callable

REPO = Path(__file__).resolve().parents[2]

from data.datasets import dataset_preset, split_dirs  # noqa: E402
from data.validation_split import (ValidationSplit, ValidationSplitError,  # noqa: E402
                                   build_validation_split, queries_per_identity,
                                   split_listing)
from utils.comparison.plan import (ComparisonPlan, MethodPlan, RunKey, RunStore,  # noqa: E402
                              StaleRun, equal_grids, late_gain, run_comparison)
from utils.checkpoints.store import last_checkpoint_path  # noqa: E402
from utils.comparison.report import (precision_text, write_budget_report,  # noqa: E402
                                     write_report)
from utils.errors import EXIT_DIVERGED, OneLineParser, report_error  # noqa: E402
from models.methods import get_method, method_names  # noqa: E402
from utils.cli.validation import UsageError  # noqa: E402

PROG = "python -m utils.comparison"


def titles() -> dict[str, str]:
    """Each registered method's name in tables."""
    return {name: get_method(name).title for name in method_names()}
SGD_LRS = (0.3, 0.1, 0.03, 0.01, 0.003)
ADAM_LRS = (2e-3, 5e-4, 2e-4)
# opqn_main.py flags the protocol sets itself, with what to use instead.
OWNED_FLAGS = {
    "lr": ("--lr", "--sgd-lrs/--adam-lrs"), "optimizer": ("--optimizer", "each method's own"),
    "epochs": ("--epochs", "--epochs/--tune-epochs before --"), "seed": ("--seed", "--seeds"),
    "save": ("--save", "--out"), "load": ("--load", "--out"), "out": ("--out", "--out"),
    "checkpoint_dir": ("--checkpoint-dir", "--out"), "log_dir": ("--log-dir", "--out"),
    "data_dir": ("--data-dir", "--data-dir before --"),
    "dataset": ("--dataset", "--dataset before --"), "method": ("--method", "--methods"),
    "len": ("--len", "--len before --"), "num": ("--num", "--num before --"),
    "words": ("--words", "--len and --num"), "cross_dataset": ("-c", "--cross"),
    "evaluate": ("-e", "nothing: the tool evaluates"), "search": ("--search", "nothing"),
    "resume": ("--resume", "nothing: the tool resumes"),
    "overwrite": ("--overwrite", "nothing: finished runs are kept"),
    "eval_every": ("--eval-every", "--val-every"),
}


class RunFailed(RuntimeError):
    """An opqn_main.py run failed for another reason than a diverging loss."""


def _number(kind: type, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: ``kind(text)``, finite and passing ``ok``, else "must be <rule>"."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            whole = "whole " if kind is int else ""
            raise argparse.ArgumentTypeError(f"not a {whole}number: {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


POSITIVE_INT = _number(int, lambda v: v > 0, "a positive number")
POSITIVE_FLOAT = _number(float, lambda v: v > 0, "a positive number")
COUNT = _number(int, lambda v: v >= 0, "zero or positive")
FRACTION = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def _method_lr(text: str) -> tuple[str, float]:
    """An argparse type: ``METHOD=LR`` with a known method and a positive lr."""
    method, sep, lr = text.partition("=")
    if not sep or method not in method_names():
        raise argparse.ArgumentTypeError(
            f"expected METHOD=LR with METHOD one of {', '.join(method_names())}, got {text!r}")
    return method, POSITIVE_FLOAT(lr)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthface")
    p.add_argument("--len", type=POSITIVE_INT, default=36, help="code length in bits (36)")
    p.add_argument("--num", type=POSITIVE_INT, default=6,
                   help="codebooks of the product-quantization methods (6)")
    p.add_argument("--methods", nargs="+", choices=method_names(), default=list(method_names()))
    p.add_argument("--epochs", type=POSITIVE_INT,
                   help="epochs of every final run (default: the dataset preset's)")
    p.add_argument("--tune-epochs", type=POSITIVE_INT,
                   help="epochs of every run of the lr grid on validation (default: --epochs, "
                        "so that the choice is made at the budget it is used with)")
    p.add_argument("--sgd-lrs", nargs="+", type=POSITIVE_FLOAT, default=list(SGD_LRS),
                   metavar="LR", help="lr grid of the SGD methods (default 0.3 0.1 0.03 "
                                      "0.01 0.003; the method's own default is added)")
    p.add_argument("--adam-lrs", nargs="+", type=POSITIVE_FLOAT, default=list(ADAM_LRS),
                   metavar="LR", help="lr grid of the Adam methods (default 2e-3 5e-4 "
                                      "2e-4; the method's own default is added)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=3,
                   help="seeds 0..S-1 of the final runs (default 3)")
    p.add_argument("--val-per-identity", type=POSITIVE_INT, default=5,
                   help="training images per identity held out as validation queries "
                        "(default 5; at most a third of the smallest identity's images)")
    p.add_argument("--val-seed", type=int, default=0, help="seed of the validation split (0)")
    p.add_argument("--val-every", type=COUNT, default=5,
                   help="validation mAP every N epochs in the grid runs, for the curves "
                        "(default 5; 0 = off)")
    p.add_argument("--min-loss-drop", type=FRACTION, default=0.05,
                   help="did not train: the last epoch's loss is less than this fraction "
                        "below the first's (0.05)")
    p.add_argument("--ce-margin", type=FRACTION, default=0.1,
                   help="did not train: the lowest cross-entropy stays above (1 - this) x "
                        "log C (0.1)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out", default="results/compare", help="folder of every output")
    p.add_argument("-c", "--cross", action="store_true", help="also run the -c protocol")
    p.add_argument("--only-cross", action="store_true", help="run only the -c protocol")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the grid runs' checkpoints (default: only the final runs')")
    p.add_argument("--measure-budget", nargs="+", type=POSITIVE_INT, metavar="EPOCHS",
                   help="instead of the comparison: train every method at its default lr "
                        "(or its --budget-lr) "
                        "on the validation split once per budget given (each run with its "
                        "own full schedule), and choose the shortest budget after which no "
                        "method's validation mAP gains --max-rise (budget_<tag>.{md,json,png})")
    p.add_argument("--budget-lr", nargs="+", type=_method_lr, default=[],
                   metavar="METHOD=LR",
                   help="--measure-budget: train METHOD at LR instead of its default lr "
                        "(e.g. the lr its grid chose), one METHOD=LR per method")
    p.add_argument("--max-rise", type=FRACTION, default=0.01,
                   help="--measure-budget: the gain that a longer budget must not reach "
                        "(0.01, one point of mAP)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The tool's flags, and the ``opqn_main.py`` flags after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.methods = list(dict.fromkeys(args.methods))  # each once, in the order given
    if args.budget_lr and not args.measure_budget:
        build_parser().error("--budget-lr goes with --measure-budget")
    named = [method for method, _ in args.budget_lr]
    if len(set(named)) != len(named):
        build_parser().error("--budget-lr: one METHOD=LR per method")
    args.budget_lr = dict(args.budget_lr)
    outside = sorted(set(args.budget_lr) - set(args.methods))
    if outside:
        build_parser().error(f"--budget-lr names a method not in --methods: "
                             f"{', '.join(outside)}")
    args.command = shlex.join(["python", "-m", "utils.comparison", *argv,
                               *(["--", *extra] if extra else [])])
    return args, extra


def run_flags(extra: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``opqn_main.py``'s reading of the flags after ``--`` (a bad one exits 2 there), and
    the flags every run gets: those, with ``--amp off`` unless --amp is among them and
    without ``--regenerate-synthface`` (the data is prepared once, before any run)."""
    import opqn_main
    from utils.cli.validation import check_options

    parser = opqn_main.build_parser()
    given, defaults = parser.parse_args(extra), parser.parse_args([])
    for dest, (flag, instead) in OWNED_FLAGS.items():
        if getattr(given, dest) != getattr(defaults, dest):
            raise UsageError(f"{flag} after -- is set by the protocol; use {instead}")
    check_options(given)  # what every training run would refuse, refused before any run
    if given.regenerate_synthface and "--regenerate-synthface" not in extra:
        raise UsageError("spell --regenerate-synthface out in full after --")
    flags = [f for f in extra if f != "--regenerate-synthface"]
    # argparse leaves a value already in the namespace alone unless the flag is given.
    if parser.parse_args(extra, namespace=argparse.Namespace(amp=None)).amp is None:
        flags += ["--amp", "off"]  # float32 unless asked: bf16 costs mAP on some CPUs
        given.amp = "off"
    return given, flags


def evaluation_flags(flags: list[str]) -> list[str]:
    """``flags`` without those that only training reads (``-e`` refuses them: the
    checkpoint holds what they set), each with its values; the rest keep their order."""
    import opqn_main
    from utils.cli.validation import TRAINING_ONLY_FLAGS

    actions = {option: action for action in opqn_main.build_parser()._actions
               for option in action.option_strings}
    kept, index = [], 0
    while index < len(flags):
        token = flags[index]
        action = actions.get(token.split("=", 1)[0])
        index += 1
        if action is None or action.dest not in TRAINING_ONLY_FLAGS:
            kept.append(token)
            continue
        if "=" in token or action.nargs == 0:  # the value is in the token, or none is taken
            continue
        if action.nargs is None:
            index += 1
        elif isinstance(action.nargs, int):
            index += action.nargs
        else:  # "?", "*", "+": the values up to the next flag
            while index < len(flags) and not flags[index].startswith("--"):
                index += 1
    return kept


def _code_flags(method: str, bits: int, num: int) -> list[str]:
    return ["--len", str(bits)] if get_method(method).hashing else \
        ["--len", str(bits), "--num", str(num)]


def _bytes_per_item(result: dict) -> tuple[int, int]:
    """(bytes as the engine stores the codes, bytes when bit-packed)."""
    words = result["num_words"]
    per_code = 1 if words <= 256 else 2 if words <= 2**15 else 4
    return result["num_books"] * per_code, math.ceil(result["bits"] / 8)


def _precision(amp: str, device_name: str, method: str, precise_bn: int) -> str:
    """What ``--amp`` gives a run of ``method`` on this machine's device: "bf16" or
    "float32" (``auto`` keeps float32 for the methods whose bf16 costs accuracy)."""
    from utils.precision import precision_name, resolve_amp
    from utils.runtime import resolve_device

    return precision_name(resolve_amp(amp, resolve_device(device_name), method,
                                      precise_bn > 0))


def method_settings(method: str, given: argparse.Namespace, input_size: int) -> dict:
    """What every run of ``method`` resolves besides the lr and seed the protocol gives it:
    its optimiser, weight decay (and Adam form), default and authors' lr, its
    hyper-parameters (``--<method>-*`` flags or their defaults) and its precision. Its
    records are checked against these, so that a default changed since makes them stale."""
    from utils.training.config import resolve_optimizer
    from utils.cli.settings import RunSettings

    run = RunSettings.from_args(argparse.Namespace(**{**vars(given), "method": method}))
    resolved = resolve_optimizer(run.training, method, input_size)
    del resolved["lr"]  # the protocol's: each run's key holds it
    if resolved["optimizer"] != "adam":  # SGD never reads them
        del resolved["adam_betas"], resolved["amsgrad"]
    optimizer = resolved["optimizer"]
    spec = get_method(method)
    return {**resolved, "default_lr": spec.default_lr(optimizer),
            "authors_lr": spec.authors_lr(optimizer), **run.model.method_fields,
            "precision": _precision(given.amp, given.device, method, given.precise_bn)}


def method_plans(args: argparse.Namespace, given: argparse.Namespace,
                 input_size: int) -> list[MethodPlan]:
    """Each compared method's optimiser, default lr, lr grid and resolved settings. The
    grids are made equal over all five methods (:func:`utils.comparison.plan.equal_grids`),
    whichever ``--methods`` are run, so that a comparison split over several processes
    by ``--methods`` runs the grids of the whole one."""
    settings = {m: method_settings(m, given, input_size) for m in method_names()}
    grids = equal_grids([(m, s["optimizer"]) for m, s in settings.items()], args.sgd_lrs,
                        args.adam_lrs)
    return [MethodPlan(m, settings[m]["optimizer"], settings[m]["default_lr"], grids[m],
                       settings[m]) for m in args.methods]


def precision_label(plans: list[MethodPlan]) -> str | dict[str, str]:
    """The comparison's precision: one name when every method trains in it, else the
    name of each method."""
    names = {plan.method: plan.settings["precision"] for plan in plans}
    return next(iter(names.values())) if len(set(names.values())) == 1 else names


def prepare_data(args: argparse.Namespace, given: argparse.Namespace,
                 cross: bool) -> tuple[Path, tuple[Path, ...], tuple[Path, ...]]:
    """Generate synthface if needed; returns (training split, the test splits the
    validation split must not touch, the extra files the validation folder needs)."""
    from utils.cli.data_folders import prepare_folders
    from utils.cli.settings import RunSettings
    from utils.cli.validation import check_split_dir

    data = replace(RunSettings.from_args(given).data, dataset=args.dataset,
                   data_dir=args.data_dir, progress=True)
    train_dir, own_test = prepare_folders(data, cross_train=cross)
    tests = [own_test]
    if cross:  # the unseen identities the final models are evaluated on
        gallery, queries = split_dirs(args.data_dir, args.dataset)
        for folder, role in ((gallery, "evaluation gallery"), (queries, "evaluation query")):
            check_split_dir(folder, role)
        tests += [gallery, queries]
    extra = (train_dir.parent / "synthface.json",) if args.dataset == "synthface" else ()
    return train_dir.resolve(), tuple(t.resolve() for t in tests), extra


class OpqnMainRunner:
    """Runs one :class:`RunKey` as ``opqn_main.py`` processes and reads back its outcome.

    Grid runs train on the validation gallery and are evaluated on the validation queries
    by ``opqn_main.py`` itself (``--eval-every`` gives the validation curve). Final runs
    train on the training split with the monitoring evaluation off, so the test split is
    used once, by the final evaluation (with -c: ``-e -c`` on the unseen identities). A run
    with a checkpoint but no record (interrupted) continues with ``--resume``.
    """

    def __init__(self, args: argparse.Namespace, flags: list[str], work: Path, cross: bool,
                 validation: ValidationSplit, amp: str,
                 precision: str | dict[str, str]) -> None:
        self.args, self.flags, self.work, self.cross = args, flags, work, cross
        self.validation, self.amp, self.precision = validation, amp, precision
        self.data_dir = str(Path(args.data_dir).resolve())

    def _command(self, key: RunKey, method: MethodPlan) -> list[str]:
        tune = key.phase == "tune"
        best = self.work / "checkpoint" / f"{key.name}.tar"
        last = last_checkpoint_path(best)
        cmd = [sys.executable, str(REPO / "opqn_main.py"), *(["-c"] if self.cross else []),
               "--method", key.method, *_code_flags(key.method, self.args.len, self.args.num),
               "--dataset", self.args.dataset,
               "--data-dir", str(self.validation.data_dir.resolve()) if tune else self.data_dir,
               "--seed", str(key.seed), "--epochs", str(key.epochs), "--lr", repr(key.lr),
               "--optimizer", method.optimizer, "--save", best.name,
               "--eval-every", str(self.args.val_every if tune else 0), *self._paths(),
               *self.flags]
        if last.is_file():
            cmd.append("--resume")  # an interrupted run continues from its last epoch
        elif best.is_file():
            cmd.append("--overwrite")  # a stray checkpoint without its run's record
        return cmd

    def _paths(self) -> list[str]:
        return ["--checkpoint-dir", str(self.work / "checkpoint"), "--log-dir",
                str(self.work / "log"), "--out", str(self.work / "results"), "--no-progress"]

    def _call(self, cmd: list[str], log_path: Path) -> tuple[int, str | None]:
        """Run ``cmd`` with its output in ``log_path``; its exit status, and None or its
        error line."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            start = log.tell()  # earlier attempts' lines stay in the log, not in the verdict
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if code == 0:
            return code, None
        if code == 130:
            raise KeyboardInterrupt
        with open(log_path, encoding="utf-8") as log:
            log.seek(start)
            lines = log.read().strip().splitlines()
        errors = [line for line in lines if "error:" in line]
        return code, (errors or lines or [f"exit {code}"])[-1]

    def __call__(self, key: RunKey, method: MethodPlan) -> dict:
        best = self.work / "checkpoint" / f"{key.name}.tar"
        log_path = self.work / "log" / f"{key.name}.out"
        start = time.perf_counter()
        cmd = self._command(key, method)
        code, error = self._call(cmd, log_path)
        stem = key.name
        if error is None and self.cross and key.phase == "final":
            code, error = self._call([sys.executable, str(REPO / "opqn_main.py"), "-e", "-c",
                                      "--dataset", self.args.dataset, "--data-dir",
                                      self.data_dir, "--load", str(best), *self._paths(),
                                      *evaluation_flags(self.flags)], log_path)
            stem = f"{key.name}_on_{self.args.dataset}_cross"
        wall = time.perf_counter() - start
        if error is not None and code != EXIT_DIVERGED:
            raise RunFailed(f"{key.name} failed: {error} (log: {log_path})")
        planned = self.precision[key.method] if isinstance(self.precision, dict) \
            else self.precision
        expected = method.settings.get("precision", planned)
        facts = self._checkpoint_facts(last_checkpoint_path(best))
        # The label is what the checkpoint says the run trained in, never the plan's guess;
        # a run that wrote no checkpoint (diverged in its first epoch) keeps the plan's.
        trained = facts.pop("precision", None) or expected
        if trained != expected:
            raise RunFailed(f"{key.name} trained in {trained}, but the comparison expected "
                            f"{expected} for {key.method} (--amp {self.amp}; log: {log_path})")
        outcome = {"status": "done" if error is None else "diverged", "error": error,
                   "wall_seconds": wall, "amp": self.amp, "precision": trained,
                   "command": shlex.join(cmd), "log": str(log_path),
                   "data": "validation" if key.phase == "tune" else "test", **facts}
        if error is None:
            result = json.loads((self.work / "results" / f"{stem}.json").read_text("utf-8"))
            outcome.update({k: result.get(k) for k in (
                "mAP", "precision_at_k", "recall_at_k", "k", "pr_curve", "num_queries",
                "num_database", "bits", "num_books", "num_words", "checkpoint_epoch")})
        if key.phase == "tune" and not self.args.keep_checkpoints:
            for path in (best, last_checkpoint_path(best)):
                path.unlink(missing_ok=True)  # its record keeps what the table needs
        return outcome

    @staticmethod
    def _checkpoint_facts(last: Path) -> dict:
        """From the run's last checkpoint: per-epoch history, class count, the chance levels
        of its identity cross-entropies, the precision it trained in, and its own config and
        training settings (what really ran)."""
        if not last.is_file():
            return {"history": [], "num_classes": 0, "ce_chance": None}
        from models.methods import chance_levels
        from models import NetConfig
        from utils.checkpoints.store import load_checkpoint

        checkpoint = load_checkpoint(last, map_location="cpu")
        history = list(checkpoint.get("history", []))
        seconds = [h["seconds"] for h in history]
        config = NetConfig.from_dict(checkpoint["config"])
        return {"history": history, "num_classes": config.num_classes,
                "ce_chance": chance_levels(config),
                "train_seconds_per_epoch": sum(seconds) / max(1, len(seconds)),
                "precision": checkpoint.get("train_precision"),
                "config": checkpoint["config"],
                "train_settings": checkpoint.get("train_settings")}


def _methods_suffix(args: argparse.Namespace) -> str:
    """``_<m1>-<m2>`` when ``--methods`` runs only some of the five, else "": a process
    of a comparison split by --methods never writes over the whole one's report."""
    return "" if set(args.methods) == set(method_names()) else "_" + "-".join(args.methods)


def budget_stem(args: argparse.Namespace, tag: str) -> str:
    """``budget_<tag>[_<methods>]``, with ``_<method><lr>`` for each --budget-lr: a
    measurement at other rates never overwrites the one at the defaults."""
    return "_".join([f"budget_{tag}{_methods_suffix(args)}",
                     *(f"{m}{lr:g}" for m, lr in args.budget_lr.items())])


def compare_stem(args: argparse.Namespace, tag: str, epochs: int) -> str:
    """``compare_<tag>_e<epochs>[_<methods>]``: comparisons at other budgets, or of some
    of the methods, get their own report."""
    return f"compare_{tag}_e{epochs}{_methods_suffix(args)}"


def _tag(args: argparse.Namespace, cross: bool) -> str:
    return f"{args.dataset}{'_cross' if cross else ''}_{args.len}bits"


def run_protocol(args: argparse.Namespace, given: argparse.Namespace, flags: list[str],
                 cross: bool) -> dict:
    """Tune, retrain and evaluate every method under one protocol; writes its outputs and
    returns the table as a dict (the JSON's content)."""
    out = Path(args.out).resolve()
    tag = _tag(args, cross)
    work = out / f"runs_{tag}"
    train_dir, test_dirs, extra_files = prepare_data(args, given, cross)
    held_out = queries_per_identity(train_dir, args.val_per_identity)
    validation = build_validation_split(train_dir, test_dirs, work / "validation",
                                        train_dir.parent.name, cross, held_out,
                                        args.val_seed, extra_files)
    preset = dataset_preset(args.dataset, cross=cross)
    epochs = args.epochs or preset.epochs
    tune_epochs = args.tune_epochs or epochs
    schedule = {"name": given.schedule or "step", "lr_step": preset.lr_step,
                "warmup": given.warmup or 0}
    settings = {"dataset": args.dataset, "protocol": "cross" if cross else "standard",
                "bits": args.len, "num_books": args.num, "data_dir": str(Path(args.data_dir)
                                                                        .resolve()),
                "flags": flags, "amp": given.amp,
                "val_every": args.val_every,
                "validation": {k: validation.info[k] for k in ("per_identity", "seed")},
                "train_listing": split_listing(train_dir),
                "test_listing": [split_listing(t) for t in test_dirs]}
    plans = method_plans(args, given, preset.input_size)
    precision = precision_label(plans)
    seeds = list(range(args.seeds))
    runner = OpqnMainRunner(args, flags, work, cross, validation, given.amp, precision)
    say = lambda line: print(line, flush=True)  # noqa: E731
    print(f"[{tag}] validation split {validation.data_dir}: {validation.info['identities']} "
          f"identities, {validation.info['gallery_images']} gallery and "
          f"{validation.info['query_images']} query images; "
          f"{precision_text(precision, titles())}", flush=True)
    if args.measure_budget:  # one run per method and budget at its default lr (or
        # its --budget-lr), no finals
        plans = [replace(p, grid=(args.budget_lr.get(p.method, p.default_lr),))
                 for p in plans]
        runs = []
        for budget in sorted(set(args.measure_budget)):
            plan = ComparisonPlan(plans, [], budget, budget, settings)
            # the count restarts with each budget: say which one it counts
            runs += run_comparison(plan, RunStore(work / "records"), runner, say=say,
                                   tag=f"{tag}, {budget} epochs")["runs"]
        return write_budget_report(runs, args, tag, out / budget_stem(args, tag),
                                   protocol=settings["protocol"])
    plan = ComparisonPlan(plans, seeds, epochs, tune_epochs, settings,
                          min_loss_drop=args.min_loss_drop, ce_margin=args.ce_margin)
    print(f"[{tag}] {plan.total_runs} runs", flush=True)
    summary = run_comparison(plan, RunStore(work / "records"), runner, say=say, tag=tag)
    if [split_listing(t) for t in test_dirs] != settings["test_listing"]:
        raise ValidationSplitError("a test split changed during the comparison")
    table = {"protocol": settings["protocol"], "dataset": args.dataset,
             "train_dataset": train_dir.parent.name, "bits": args.len,
             "num_books": args.num, "selection": "validation",
             "validation": {**validation.info, "folder": str(validation.data_dir)},
             "epochs": epochs, "tune_epochs": tune_epochs, "schedule": schedule,
             "seeds": plan.seeds, "tune_seed": plan.tune_seed, "amp": given.amp,
             "precision": precision, "grid": {"sgd": args.sgd_lrs, "adam": args.adam_lrs},
             "did_not_train_rule": {"min_loss_drop": args.min_loss_drop,
                                    "ce_margin": args.ce_margin},
             "command": args.command,
             "flags": flags, **summary}
    _add_run_facts(table)
    write_report(table, out / compare_stem(args, tag, epochs))
    return table


def _add_run_facts(table: dict) -> None:
    """Per method: name, code, bytes per item, seconds, precision and the curves the
    figures draw, from its runs' records."""
    runs = {RunKey(**r["key"]).name: r["outcome"] for r in table["runs"]}
    table["wall_seconds"] = sum(o.get("wall_seconds", 0.0) for o in runs.values())
    table["k"] = next((o["k"] for o in runs.values() if o.get("k")), 5)
    for method, entry in table["methods"].items():
        finals = [runs[name] for name in entry["runs"]]
        done = [o for o in finals if o["status"] == "done"]
        entry["name"] = get_method(method).title
        if done:
            entry["code"] = f"{done[0]['num_books']}x{done[0]['num_words']}"
            entry["bytes_per_item"], entry["packed_bytes_per_item"] = _bytes_per_item(done[0])
        planned = table["precision"]
        entry["precision"] = sorted({o["precision"] for o in finals}) or [
            planned[method] if isinstance(planned, dict) else planned]
        entry["wall_seconds"] = [o.get("wall_seconds") for o in finals]
        seconds = [o["train_seconds_per_epoch"] for o in finals
                   if o.get("train_seconds_per_epoch")]
        entry["train_seconds_per_epoch"] = sum(seconds) / len(seconds) if seconds else None
        entry["tune_wall_seconds"] = sum(runs[g["run"]].get("wall_seconds", 0.0)
                                         for g in entry["lr_grid"])
        entry["loss_curve"] = [h["loss"] for h in finals[0]["history"]] if finals else []
        entry["val_curves"] = {
            str(g["lr"]): [[h["epoch"], h["monitor_mAP"]] for h in runs[g["run"]]["history"]
                           if h.get("monitor_mAP") is not None]
            for g in entry["lr_grid"]}
        entry["pr_curve"] = _mean_curve([o["pr_curve"] for o in done if o.get("pr_curve")])
        chosen = entry["val_curves"].get(str(entry["chosen_lr"]), [])
        entry["val_late_gain"] = late_gain(chosen)


def _mean_curve(curves: list[dict]) -> dict | None:
    """The PR curve averaged over seeds (same cutoffs: the same gallery), else the first."""
    if not curves:
        return None
    if any(c.get("cutoffs") != curves[0].get("cutoffs") for c in curves):
        return curves[0]
    mean = {}
    for field in ("precision", "recall"):
        columns = zip(*(c[field] for c in curves))
        mean[field] = [None if None in col else sum(col) / len(col) for col in columns]
    return {**mean, "cutoffs": curves[0].get("cutoffs")}


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    protocols = [True] if args.only_cross else [False, True] if args.cross else [False]
    try:
        given, flags = run_flags(extra)
        for cross in protocols:
            table = run_protocol(args, given, flags, cross)
            tag = _tag(args, cross)
            stem = budget_stem(args, tag) if args.measure_budget else \
                compare_stem(args, tag, table["epochs"])
            print(Path(args.out) / f"{stem}.md", flush=True)
    except (UsageError, ValidationSplitError, StaleRun) as exc:
        return report_error(PROG, str(exc), 2)
    except RunFailed as exc:
        return report_error(PROG, str(exc), 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to continue (finished runs "
              f"are reused)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""OPQN: Orthonormal Product Quantization Network for scalable face image retrieval.

Train:     python opqn_main.py --dataset facescrub --len 36 --num 6 --words 64
Evaluate:  python opqn_main.py -e --dataset facescrub --load m1.tar m2.tar --len 16 24 --num 2 4
Cross:     add -c (train on vggface2/cross_train; evaluate on unseen identities)
Search:    python opqn_main.py --search --load m.tar --gallery DIR --query a.jpg b.jpg --topk 10
Methods:   --method NAME trains a compared method (the methods group below)
"""
from __future__ import annotations

import argparse
import os
import sys

from data.datasets import PRESETS
from models.registry import BackboneError
from utils.checkpoints.store import CheckpointError
from utils.errors import EXIT_DIVERGED, OneLineParser, first_line, report_error
from models.methods import DEFAULT_METHOD, get_method, method_names
from utils.training.precise_bn import DEFAULT_PRECISE_BN_IMAGES
from utils.runtime import DEVICE_CHOICES, DeviceError
from utils.cli.validation import UsageError, check_options, code_specs, hashing_specs

PROG = "opqn_main.py"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="PyTorch implementation of Orthonormal Product "
                      "Quantization Network (OPQN)\nfor scalable face image retrieval.",
                      epilog="examples:\n" + __doc__.split("\n\n", 1)[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run (default: train one model per code length)")
    g.add_argument("-e", "--evaluate", action="store_true",
                   help="evaluate the models given by --load instead of training")
    g.add_argument("-c", "--cross-dataset", action="store_true",
                   help="cross-dataset protocol: train a 112x112 model on vggface2/cross_train; "
                        "with -e, evaluate it on --dataset's unseen identities")
    g.add_argument("--search", action="store_true",
                   help="rank a gallery for query photos with the model of --load; writes "
                        "search.json, search.png and search.html under --out")
    g.add_argument("--save", nargs="+", metavar="NAME",
                   help="checkpoint name(s) under --checkpoint-dir, one per model "
                        "(default: <dataset>_<bits>bits.tar)")
    g.add_argument("--load", nargs="+", metavar="NAME",
                   help="checkpoint(s) to evaluate, names under --checkpoint-dir or paths")
    g.add_argument("--resume", action="store_true",
                   help="continue the run named by --save from its last checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="let training replace existing checkpoints of --save (without it, or "
                        "--resume, an existing checkpoint is an error)")
    g = p.add_argument_group("model and code")
    g.add_argument("--len", nargs="+", type=int, metavar="BITS",
                   help="code length(s) L = M*log2(K) in bits, one per model")
    g.add_argument("--num", "--num-books", dest="num", nargs="+", type=int, metavar="M",
                   help="number of codebooks M, one per model (--num-books is the same flag, "
                        "for torchrun, which takes --num as its own --numa-binding)")
    g.add_argument("--words", nargs="+", type=int, metavar="K",
                   help="codewords per codebook K (a power of two), one per model "
                        "(default: 2**(len/num))")
    g.add_argument("--margin", type=float, default=0.5, help="margin m at the target class "
                   "(0.5): cos - m with the default cosface, radians with --margin-type arcface")
    g.add_argument("--miu", type=float, default=0.1, help="weight of the entropy term (0.1)")
    g.add_argument("--scale", type=float, help="logit scale s (default 20 at 32x32, 40 at 112)")
    g.add_argument("--margin-type", choices=("cosface", "arcface"),
                   help="target-class margin: cosface = cos - m (the paper's, default), "
                        "arcface = cos(theta + m), m in radians (0.5 is common)")
    g.add_argument("--width", type=int, help="backbone width: 64 is the paper's network, 16 "
                   "the narrow CPU variant (default: 64; 16 for synthface)")
    g.add_argument("--feature-dim", type=int, help="feature dimension D (default: 512, or 516 "
                   "for M=6, raised to M*K if smaller; M*K at 112x112)")
    g.add_argument("--backbone", metavar="NAME", help="face backbone: sphere20 (the paper's "
                   "network, default) or a timm model with a feature map, e.g. "
                   "edgenext_x_small or resnet18, with the paper's BN-Dropout-Linear-BN head")
    g.add_argument("--backbone-args", nargs="+", metavar="KEY=VALUE",
                   help="extra timm.create_model arguments, e.g. output_stride=8 (resnet*: "
                        "a 4x4 map at 32x32); stored in the checkpoint")
    g.add_argument("--pretrained", action="store_true",
                   help="start a timm backbone from timm's pretrained weights (needs network "
                        "access or the local Hugging Face cache)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="training epochs (default: the paper's value: "
                   "200 for 32x32 datasets, lr halved every 35; 160 for VGGFace2, halved "
                   "every 20; synthface: 45, halved every 15)")
    g.add_argument("--lr", type=float, help="initial learning rate (default: the method's, "
                   f"{_per_method(lambda s: _lr_text(s))})")
    g.add_argument("--bs", type=int, help="batch size (default 256; 64 for synthface); "
                   "training drops an epoch's last partial batch, so the training split must "
                   "hold at least one batch")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--schedule", choices=("step", "cosine"),
                   help="learning-rate schedule: step = the paper's halving (default), "
                        "cosine = decay to 0 over --epochs")
    g.add_argument("--warmup", type=int, metavar="EPOCHS",
                   help="--schedule cosine: linear warmup epochs before the decay (default 0)")
    g.add_argument("--eval-every", type=int, default=5,
                   help="monitoring evaluation (P@50, mAP) every N epochs; 0 turns it off")
    g.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast and channels_last for the backbone in training (the "
                        "quantization head, loss, codes and query tables stay float32); auto: "
                        "on with CUDA and on CPUs with AMX (default auto)")
    g.add_argument("--precise-bn", type=int, default=DEFAULT_PRECISE_BN_IMAGES, metavar="N",
                   help="after training, recompute every BatchNorm's statistics in float32 "
                        "over N training images under the evaluation transform, in the saved "
                        f"models (default {DEFAULT_PRECISE_BN_IMAGES}; 0: keep the training "
                        "averages)")
    g = p.add_argument_group("evaluation (after training, and -e)")
    g.add_argument("--topk", type=int, help="k of precision@k in the final evaluation "
                   "(default: 5, or 10 for VGGFace2)")
    g.add_argument("--ties", choices=("expected", "stable"), default="expected",
                   help="how tied scores are ranked (default: exact expectation)")
    g.add_argument("--export-faiss", nargs="+", metavar="PATH",
                   help="with -e: write each model's gallery as a faiss index file (IndexPQ; "
                        "IndexIVFPQ with --index-type ivf; a bare name goes under --out), "
                        "with its id->image list <stem>.ids.csv beside")
    g.add_argument("--allow-identity-overlap", action="store_true",
                   help="with -e -c: evaluate even if the evaluation set shares identities "
                        "with the model's training set (the protocol needs them disjoint)")
    g = p.add_argument_group("search (--search) and faiss indexes")
    g.add_argument("--gallery", metavar="DIR", help="with --search: folder of gallery images "
                   "(<identity>/ sub-folders optional; default: --dataset's train split)")
    g.add_argument("--query", nargs="+", metavar="PATH", help="with --search: query image "
                   "files and/or folders (default: --dataset's test split)")
    g.add_argument("--index", metavar="FILE", help="with --search: the gallery index to reuse "
                   "or build (default: <out>/<model>_<gallery>.index.tar)")
    g.add_argument("--rebuild-index", action="store_true",
                   help="with --search: encode the gallery again even if the index is current")
    g.add_argument("--grid-rows", type=int, default=20,
                   help="with --search: queries drawn in search.png (default 20)")
    g.add_argument("--index-type", choices=("flat", "ivf"), default="flat",
                   help="with --search or --export-faiss: flat scans every code (default); "
                        "ivf (inverted file over the model's own codes) scans --nprobe of "
                        "--nlist lists")
    g.add_argument("--nlist", type=int, help="--index-type ivf: number of lists (default: a "
                   "power of two near sqrt(gallery size), at least 39 items a list)")
    g.add_argument("--nprobe", type=int, help="--index-type ivf: lists scanned per query "
                   "(default nlist/16; nprobe = nlist gives the flat index's results)")
    g = p.add_argument_group("galleries in Milvus (--milvus), Lite or a server")
    g.add_argument("--milvus", metavar="URI", help="with --search: keep the gallery in Milvus "
                   "and search it there; with -e: write each model's gallery there. A file "
                   "name ending in .db is Milvus Lite (embedded, no server); "
                   "http(s)://host:port is a Milvus server or cluster")
    g.add_argument("--milvus-token", metavar="TOKEN", default=os.environ.get("MILVUS_TOKEN"),
                   help="--milvus server: user:password or API key (default: $MILVUS_TOKEN)")
    g.add_argument("--milvus-collection", metavar="NAME", help="--milvus: the collection "
                   "(default: opqn_<checkpoint name>)")
    g.add_argument("--milvus-timeout", type=float, default=30.0, metavar="S",
                   help="--milvus: seconds to wait for the server on each call (default 30)")
    g.add_argument("--where", metavar="EXPR", help="with --search --milvus: a Milvus filter "
                   "on the gallery's metadata (path, identity, model, added), e.g. "
                   "'identity in [\"a\", \"b\"]' or 'path like \"/photos/2024/%%\"'")
    g.add_argument("--milvus-delete", nargs="+", metavar="PATH", help="with --search "
                   "--milvus: delete these images from the gallery before searching")
    _add_method_flags(p)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="facescrub",
                   help=f"dataset under --data-dir: {', '.join(PRESETS)}, or any folder with "
                        f"train/ and test/ (default facescrub)")
    g.add_argument("--data-dir", default="./data", help="datasets root (default ./data)")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="decode and resize every image once into a uint8 memory map beside "
                        "each split (<split>.cache-35/ or .cache-120/), rebuilt when the split "
                        "changes (default: on for synthface, off otherwise)")
    g.add_argument("--workers", type=int, help="data-loading processes "
                   "(default: min(4, CPU count))")
    g.add_argument("--synthface-identities", type=int,
                   help="synthface only: number of identities to generate (default 100; the "
                        "disjoint -c set gets half as many, 60 by default)")
    g.add_argument("--synthface-images", type=int,
                   help="synthface only: training images per identity (default 30; 5 test)")
    g.add_argument("--regenerate-synthface", action="store_true",
                   help="replace an existing synthface whose size differs from the "
                        "--synthface-* flags (never done otherwise; not with -e)")
    g = p.add_argument_group("runtime and outputs")
    g.add_argument("--device", default="auto", help=f"{'|'.join(DEVICE_CHOICES)}|cuda:N "
                   "(default auto: CUDA when present, else MPS on Apple GPUs, else CPU)")
    g.add_argument("--out", default="results", help="results folder (default results/)")
    g.add_argument("--checkpoint-dir", default="checkpoint", help="default checkpoint/")
    g.add_argument("--log-dir", default="log", help="training logs (default log/)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods", "the compared methods (training; -e reads the method "
                             "from each checkpoint)")
    g.add_argument("--method", choices=method_names(), help="; ".join(
        f"{name}: {get_method(name).summary}" for name in method_names()))
    g.add_argument("--optimizer", choices=("sgd", "adam"), help="default: the method's "
                   "authors': " + _per_method(lambda s: s.optimizer + (
                       f", {s.optimizer_112} at 112x112" if s.optimizer_112 else "")))
    g.add_argument("--weight-decay", type=float, metavar="WD", help="default: the method's: " +
                   _per_method(lambda s: f"{s.default_weight_decay(s.optimizer):g}"))
    g.add_argument("--adam-betas", type=float, nargs=2, metavar=("B1", "B2"),
                   help="adam's betas (default: the method's: " + _per_method(
                       lambda s: " ".join(f"{b:g}" for b in s.adam_form().betas)) + ")")
    g.add_argument("--amsgrad", action=argparse.BooleanOptionalAction,
                   help="adam's amsgrad variant (default: the method's: " + _per_method(
                       lambda s: "on" if s.adam_form().amsgrad else "off") + ")")
    for method in method_names():
        for info in get_method(method).param_info():
            kind = {"choices": info.choices} if info.choices else {"type": float}
            g.add_argument(f"--{info.name.replace('_', '-')}", default=info.default,
                           help=f"{method}: {info.help}", **kind)


def _lr_text(spec) -> str:
    lrs = {spec.optimizer: spec.default_lr(spec.optimizer)}
    if spec.optimizer_112:
        lrs[spec.optimizer_112] = spec.default_lr(spec.optimizer_112)
    return " or ".join(f"{lr:g} ({optimizer})" for optimizer, lr in lrs.items())


def _per_method(describe) -> str:
    """``opqn X, l2q Y, ...``: one setting of every registered method, for --help."""
    return "; ".join(f"{name} {describe(get_method(name))}" for name in method_names())


def _resume_hint(exc: BaseException, argv: list[str] | None) -> str:
    """How to continue an interrupted training run (empty when there is nothing to add)."""
    resumable = getattr(exc, "resumable", None)  # set by utils.training.loop.TrainingInterrupted
    if resumable is None:
        return ""
    if not resumable:
        return "; no epoch had finished, so rerun the same command to start again"
    import shlex

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return f"; continue with: {shlex.join(['python', PROG, *args])}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        from utils.cli.settings import RunSettings
        from utils.runtime import resolve_device

        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        run = RunSettings.from_args(args)
        if args.search:
            from utils.cli.search import run_search

            run_search(run, device)
        elif args.evaluate:
            specs = code_specs(args.len, args.num, args.words, args.load, "--load", False)
            if args.export_faiss and len(args.export_faiss) != len(specs):
                raise UsageError(f"--export-faiss needs one path per model: got "
                                 f"{len(args.export_faiss)} for {len(specs)} models")
            from utils.cli.pipeline import run_evaluation

            run_evaluation(run, specs, device)
        else:
            specs = (hashing_specs(args.len, args.save)
                     if get_method(args.method or DEFAULT_METHOD).hashing
                     else code_specs(args.len, args.num, args.words, args.save, "--save", True))
            from utils.cli.pipeline import run_training

            run_training(run, specs, device)
    except (UsageError, DeviceError) as exc:
        return report_error(PROG, first_line(exc), 2)
    except BackboneError as exc:  # e.g. --pretrained weights out of reach
        return report_error(PROG, first_line(exc), 1)
    except CheckpointError as exc:
        return report_error(PROG, first_line(exc), 2 if "not found" in str(exc) else 1)
    except KeyboardInterrupt as exc:
        print(f"{PROG}: interrupted{_resume_hint(exc, argv)}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if os.environ.get("OPQN_DEBUG"):
            raise
        from utils.training.loop import TrainingDiverged

        detail = first_line(exc)
        diverged = isinstance(exc, TrainingDiverged)
        if not diverged:
            detail = f"{type(exc).__name__}: {detail}"
        return report_error(PROG, f"{detail} (set OPQN_DEBUG=1 for a traceback)",
                            EXIT_DIVERGED if diverged else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

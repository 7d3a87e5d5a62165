"""OPQN: Orthonormal Product Quantization Network for scalable face image retrieval.

Train:     python opqn_main.py --dataset facescrub --len 36 --num 6 --words 64
Evaluate:  python opqn_main.py -e --dataset facescrub --load m1.tar m2.tar --len 16 24 --num 2 4
Cross:     add -c (train on vggface2/cross_train; evaluate on unseen identities)
"""
from __future__ import annotations

import argparse
import os
import sys

from data.datasets import PRESETS
from utils.checkpoint import CheckpointError
from utils.runtime import DEVICE_CHOICES, DeviceError
from utils.validation import UsageError, check_options, code_specs

PROG = "opqn_main.py"


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (plus a --help hint) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="PyTorch implementation of Orthonormal Product "
                      "Quantization Network (OPQN) for scalable face image retrieval.")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default 0.1)")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="evaluate the models given by --load instead of training")
    p.add_argument("-c", "--cross-dataset", action="store_true",
                   help="cross-dataset protocol: train a 112x112 model on vggface2/cross_train; "
                        "with -e, evaluate it on --dataset's unseen identities")
    p.add_argument("--bs", type=int, help="batch size (default 256; 64 for synthface)")
    p.add_argument("--save", nargs="+", metavar="NAME",
                   help="checkpoint name(s) under --checkpoint-dir, one per model "
                        "(default: <dataset>_<bits>bits.tar)")
    p.add_argument("--load", nargs="+", metavar="NAME",
                   help="checkpoint(s) to evaluate, names under --checkpoint-dir or paths")
    p.add_argument("--len", nargs="+", type=int, metavar="BITS",
                   help="code length(s) L = M*log2(K) in bits, one per model")
    p.add_argument("--num", "--num-books", dest="num", nargs="+", type=int, metavar="M",
                   help="number of codebooks M, one per model (--num-books is the same flag, "
                        "for torchrun, which takes --num as its own --numa-binding)")
    p.add_argument("--words", nargs="+", type=int, metavar="K",
                   help="codewords per codebook K (a power of two), one per model "
                        "(default: 2**(len/num))")
    p.add_argument("--dataset", default="facescrub",
                   help=f"dataset under --data-dir: {', '.join(PRESETS)}, or any folder with "
                        f"train/ and test/ (default facescrub)")
    p.add_argument("--margin", type=float, default=0.5, help="additive cosine margin (0.5)")
    p.add_argument("--miu", type=float, default=0.1, help="weight of the entropy term (0.1)")
    # Beyond the original flags.
    p.add_argument("--data-dir", default="./data", help="datasets root (default ./data)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the paper's value: "
                   "200 for 32x32 datasets, 160 for VGGFace2)")
    p.add_argument("--device", default="auto", help=f"{'|'.join(DEVICE_CHOICES)}|cuda:N "
                   "(default auto: CUDA when present)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, help="data-loading processes "
                   "(default: min(4, CPU count))")
    p.add_argument("--out", default="results", help="results folder (default results/)")
    p.add_argument("--checkpoint-dir", default="checkpoint", help="default checkpoint/")
    p.add_argument("--log-dir", default="log", help="training logs (default log/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run named by --save from its last checkpoint")
    p.add_argument("--width", type=int, help="backbone width: 64 is the paper's network, 16 "
                   "the narrow CPU variant (default: 64; 16 for synthface)")
    p.add_argument("--feature-dim", type=int, help="feature dimension D (default: 512, or 516 "
                   "for M=6, raised to M*K if smaller; M*K at 112x112)")
    p.add_argument("--scale", type=float, help="logit scale s (default 20 at 32x32, 40 at 112)")
    p.add_argument("--eval-every", type=int, default=5,
                   help="monitoring evaluation (P@50, mAP) every N epochs; 0 turns it off")
    p.add_argument("--topk", type=int, help="k of precision@k in the final evaluation "
                   "(default: 5, or 10 for VGGFace2)")
    p.add_argument("--ties", choices=("expected", "stable"), default="expected",
                   help="how tied scores are ranked (default: exact expectation)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="decode and resize every image once into a uint8 memory map beside "
                        "each split (<split>.cache-35/ or .cache-120/), rebuilt when the split "
                        "changes (default: on for synthface, off otherwise)")
    p.add_argument("--export-faiss", nargs="+", metavar="PATH",
                   help="with -e: write each model's gallery as a faiss IndexPQ file")
    p.add_argument("--synthface-identities", type=int,
                   help="synthface only: number of identities to generate")
    p.add_argument("--synthface-images", type=int,
                   help="synthface only: training images per identity")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast and channels_last for the backbone in training (the quantization "
                        "head, loss, codes and query tables stay float32); auto: on with CUDA "
                        "and on CPUs with AMX or AVX512-BF16 (default auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (e.g. load_state_dict errors span many)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        from utils.runtime import resolve_device  # torch import deferred past --help

        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.evaluate:
            specs = code_specs(args.len, args.num, args.words, args.load, "--load", False)
            if args.export_faiss and len(args.export_faiss) != len(specs):
                raise UsageError(f"--export-faiss needs one path per model: got "
                                 f"{len(args.export_faiss)} for {len(specs)} models")
            from utils.pipeline import run_evaluation

            run_evaluation(args, specs, device)
        else:
            specs = code_specs(args.len, args.num, args.words, args.save, "--save", True)
            from utils.pipeline import run_training

            run_training(args, specs, device)
    except (UsageError, DeviceError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if "not found" in str(exc) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if os.environ.get("OPQN_DEBUG"):
            raise
        from utils.training import TrainingDiverged

        detail = _one_line(exc)
        if not isinstance(exc, TrainingDiverged):
            detail = f"{type(exc).__name__}: {detail}"
        print(f"{PROG}: error: {detail} (set OPQN_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's comparison under one protocol: OPQN, OPQN-l2q, DPQ, GPQ and DCDH.

Trains every method at one code length on one dataset with the same backbone, data
pipeline, epochs, batch size and seed (each method with its own default learning rate and
optimiser, see ``utils/methods.py``), evaluates each with the same ADC engine, and writes

* ``<out>/compare_<dataset>_<bits>bits.md`` and ``.json``: mAP, P@k, R@k, training seconds
  per epoch, and bytes per gallery item (as stored, and bit-packed);
* ``<out>/compare_<dataset>_<bits>bits_pr.png``: one PR figure with every method's curve;

and, with ``--cross`` (or ``--only-cross``), the same for the cross-dataset protocol (-c:
train on the cross-training identities at 112x112, evaluate on ``--dataset``'s unseen
identities), named ``compare_<dataset>_cross_<bits>bits.*``.

Each method runs ``opqn_main.py`` in its own process, so a run is exactly what a user gets
from the command line. Example::

    python bench/compare_methods.py --dataset synthface --len 36
    python bench/compare_methods.py --dataset synthface --len 36 --epochs 20 --cross

Product-quantization methods use ``--num`` codebooks (default 6) of ``2**(len/num)`` words;
DCDH uses ``--len`` bits. Extra ``opqn_main.py`` flags go after ``--``.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere

from utils.reporting import plot_pr_curves  # noqa: E402
from utils.validation import HASHING_METHODS, METHODS  # noqa: E402

NAMES = {"opqn": "OPQN", "l2q": "OPQN-l2q", "dpq": "DPQ", "gpq": "GPQ", "dcdh": "DCDH"}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthface")
    p.add_argument("--len", type=int, default=36, help="code length in bits (36)")
    p.add_argument("--num", type=int, default=6,
                   help="codebooks of the product-quantization methods (6)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--epochs", type=int, help="epochs for every method (default: preset)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out", default="results/compare", help="folder of every output")
    p.add_argument("--cross", action="store_true", help="also run the -c protocol")
    p.add_argument("--only-cross", action="store_true", help="run only the -c protocol")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-done", action="store_true",
                   help="reuse the methods an earlier run with the same flags finished "
                        "(delete a method's results/<name>.json to redo it)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    return p.parse_args(argv), extra


def _run(cmd: list[str], log_path: Path) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        tail = log_path.read_text(encoding="utf-8").strip().splitlines()[-1:]
        raise SystemExit(f"compare_methods: {' '.join(cmd[1:4])}... failed (exit {code}): "
                         f"{tail[0] if tail else ''} (log: {log_path})")


def _code_flags(method: str, bits: int, num: int) -> list[str]:
    return ["--len", str(bits)] if method in HASHING_METHODS else \
        ["--len", str(bits), "--num", str(num)]


def _bytes_per_item(result: dict) -> tuple[int, int]:
    """(bytes as the engine stores the codes, bytes when bit-packed)."""
    words = result["num_words"]
    per_code = 1 if words <= 256 else 2 if words <= 2**15 else 4
    return result["num_books"] * per_code, math.ceil(result["bits"] / 8)


def run_protocol(args: argparse.Namespace, extra: list[str], cross: bool) -> dict:
    """Train and evaluate every method; returns the table as a dict."""
    out = Path(args.out).resolve()
    tag = f"{args.dataset}{'_cross' if cross else ''}_{args.len}bits"
    work = out / f"runs_{tag}"
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "commands.log"
    common = ["--dataset", args.dataset, "--data-dir", str(Path(args.data_dir).resolve()),
              "--seed", str(args.seed), "--checkpoint-dir", str(work / "checkpoint"),
              "--log-dir", str(work / "log"), "--out", str(work / "results"), "--no-progress",
              *extra]
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    rows = []
    for method in args.methods:
        name = f"{method}_{tag}.tar"
        train = [sys.executable, str(REPO / "opqn_main.py"), "--method", method,
                 *_code_flags(method, args.len, args.num), "--save", name, *common, *epochs]
        if cross:
            train.insert(2, "-c")
        stem = Path(name).stem
        if cross:
            stem = f"{stem}_on_{args.dataset}_cross"
        done = (work / "results" / f"{stem}.json").is_file()
        start = time.perf_counter()
        if not (args.skip_done and done):
            _run(train, log_path)
            if cross:  # evaluate on the unseen identities of --dataset
                evaluate = [sys.executable, str(REPO / "opqn_main.py"), "-e", "-c", "--load",
                            str(work / "checkpoint" / name), *common]
                _run(evaluate, log_path)
        wall = time.perf_counter() - start
        result = json.loads((work / "results" / f"{stem}.json").read_text(encoding="utf-8"))
        history = _history(work / "checkpoint" / name)
        seconds = [h["seconds"] for h in history]
        stored, packed = _bytes_per_item(result)
        rows.append({
            "method": method, "name": NAMES[method], "mAP": result["mAP"],
            "precision_at_k": result["precision_at_k"], "recall_at_k": result["recall_at_k"],
            "k": result["k"], "bits": result["bits"],
            "code": f"{result['num_books']}x{result['num_words']}",
            "train_seconds_per_epoch": sum(seconds) / max(1, len(seconds)),
            "epochs": len(history), "checkpoint_epoch": result.get("checkpoint_epoch"),
            "bytes_per_item": stored, "packed_bytes_per_item": packed,
            "wall_seconds": wall, "pr_curve": result["pr_curve"],
            "num_queries": result["num_queries"], "num_database": result["num_database"],
        })
        print(f"[{tag}] {NAMES[method]}: mAP {100 * result['mAP']:.2f}%  "
              f"P@{result['k']} {100 * result['precision_at_k']:.2f}%", flush=True)
    table = {"dataset": args.dataset, "cross_dataset": cross, "bits": args.len,
             "command": " ".join(["python", "bench/compare_methods.py", *sys.argv[1:]]),
             "rows": rows}
    write_table(table, out / f"compare_{tag}")
    return table


def _history(path: Path) -> list[dict]:
    from utils.checkpoint import load_checkpoint

    return list(load_checkpoint(path, map_location="cpu").get("history", []))


def write_table(table: dict, stem: Path) -> None:
    """``stem.json``, ``stem.md`` and ``stem_pr.png``."""
    rows = table["rows"]
    k = rows[0]["k"] if rows else 5
    lines = [f"| method | code | mAP | P@{k} | R@{k} | train s/epoch | bytes/item (stored, "
             f"packed) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bits']} bits ({r['code']}) | {100 * r['mAP']:.2f}% | "
                     f"{100 * r['precision_at_k']:.2f}% | {100 * r['recall_at_k']:.2f}% | "
                     f"{r['train_seconds_per_epoch']:.1f} | {r['bytes_per_item']}, "
                     f"{r['packed_bytes_per_item']} |")
    protocol = "cross-dataset (-c, unseen identities)" if table["cross_dataset"] else "standard"
    header = (f"{table['dataset']}, {table['bits']} bits, {protocol} protocol: "
              f"`{table['command']}`\n\n")
    stem.with_suffix(".md").write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    curves = [(f"{r['name']} (mAP {100 * r['mAP']:.1f}%)", r["pr_curve"]) for r in rows]
    plot_pr_curves(curves, stem.with_name(stem.name + "_pr.png"),
                   title=f"{table['dataset']}{' -c' if table['cross_dataset'] else ''}: "
                         f"{table['bits']} bits")


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    protocols = [True] if args.only_cross else [False, True] if args.cross else [False]
    for cross in protocols:
        table = run_protocol(args, extra, cross)
        print(Path(args.out) / f"compare_{table['dataset']}{'_cross' if cross else ''}_"
              f"{table['bits']}bits.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

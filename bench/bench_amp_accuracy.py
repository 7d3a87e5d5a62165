"""bf16 against float32 training: retrieval mAP, and where the bf16 gap comes from.

    python -m bench.digits_set --data-dir data
    python -m bench.bench_amp_accuracy --dataset digits --methods opqn gpq dcdh --seeds 0 1 2
    python -m bench.bench_amp_accuracy --dataset synthface --seeds 0 1 2 -- \
        --synthface-identities 40 --synthface-images 15

For every method, seed and precision (``--amp off`` and ``--amp bf16``; ``--variants`` adds
``bf16-bn32``, bf16 training with every BatchNorm2d run in float32) it trains one model
through ``opqn_main.py`` with precise BN off (``--precise-bn 0``), then evaluates the
lowest-loss checkpoint in float32 four ways, each from the stored weights:

- ``stored``: the BatchNorm running statistics as training left them;
- ``precise``: all statistics recomputed over the training images under the evaluation
  transform (:func:`utils.training.precise_bn.recompute_bn_statistics`, what training now does);
- ``precise-aug``: the same, but over the augmented training images (train transform);
- ``precise-head``: only the face head's two BatchNorm1d recomputed (backbone as stored).

It also records, per model, the share of gallery codes that change between ``stored`` and
``precise``, and how close to ties the code argmax is: the margin between the best and the
second assignment logit of the normalised sub-vector (OPQN and l2q).

Every run is saved as ``<out>/runs/<method>_<variant>_seed<s>.json`` and reused when the
script is run again with the same flags; ``<out>/amp_accuracy_<dataset>.md`` and ``.json``
hold the table (mean ± sd over seeds) and every run. Flags after ``--`` go to every
``opqn_main.py`` call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import opqn_main  # noqa: E402
from data.datasets import dataset_preset, split_dirs  # noqa: E402
from data.loaders import build_splits, make_loader  # noqa: E402
from models.precision import fp32_zone  # noqa: E402
from utils.checkpoints.store import load_checkpoint  # noqa: E402
from utils.retrieval.encoding import evaluate_model, extract_features  # noqa: E402
from utils.training.precise_bn import recompute_bn_statistics  # noqa: E402
from utils.checkpoints.loading import load_model  # noqa: E402

VARIANTS = {"off": "off", "bf16": "bf16", "bf16-bn32": "bf16"}  # variant -> --amp
EVALUATIONS = ("stored", "precise", "precise-aug", "precise-head")


@contextlib.contextmanager
def batchnorm2d_in_fp32() -> Iterator[None]:
    """Every BatchNorm2d casts its input up and normalises in float32 with autocast off
    (the next convolution casts back to bf16): the fourth lead of the bf16 analysis."""
    original = nn.BatchNorm2d.forward

    def forward(self, x):
        with fp32_zone():
            return original(self, x.float())

    nn.BatchNorm2d.forward = forward
    try:
        yield
    finally:
        nn.BatchNorm2d.forward = original


def _train(args, method: str, variant: str, seed: int, root: Path) -> tuple[Path, float]:
    name = f"{method}_{variant}_seed{seed}"
    argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--method", method,
            "--len", str(args.len), "--epochs", str(args.epochs), "--seed", str(seed),
            "--amp", VARIANTS[variant], "--precise-bn", "0", "--eval-every", "0",
            "--no-progress", "--workers", "0", "--save", f"{name}.tar", "--overwrite",
            "--checkpoint-dir", str(root / "checkpoint"), "--out", str(root / "results"),
            "--log-dir", str(root / "log"), "--width", str(args.width), "--bs", str(args.bs),
            *(["--num", str(args.num), "--words", str(args.words)] if method != "dcdh" else []),
            *args.extra]
    start = time.perf_counter()
    with batchnorm2d_in_fp32() if variant == "bf16-bn32" else contextlib.nullcontext():
        code = opqn_main.main(argv)
    if code:
        raise SystemExit(f"training {name} failed with exit code {code}")
    return root / "checkpoint" / f"{name}.tar", time.perf_counter() - start


def _assignment_margins(model, features: torch.Tensor) -> dict | None:
    """Best minus second assignment logit of the normalised sub-vectors (OPQN, l2q)."""
    quantizer = model.quantizer
    if not hasattr(quantizer, "assignment_logits"):
        return None
    with fp32_zone():
        sub = F.normalize(quantizer.split(features), dim=-1)  # (N, M, d)
        top2 = quantizer.assignment_logits(sub).topk(2, dim=-1).values  # (N, M, 2)
    margin = (top2[..., 0] - top2[..., 1]).flatten()
    return {"median": margin.median().item(), "p10": margin.quantile(0.1).item(),
            "below_0.01": (margin < 0.01).double().mean().item()}


def _evaluate(model, splits, args, device) -> tuple[float, torch.Tensor]:
    gallery = make_loader(splits.gallery, 256, 0, device)
    queries = make_loader(splits.queries, 256, 0, device)
    result, codes, _ = evaluate_model(model, gallery, queries, device, k=5, progress=False)
    return result["mAP"], codes


def analyse(path: Path, splits, args, device) -> dict:
    """The four evaluations, code changes and margins of one checkpoint."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    out: dict = {"checkpoint_epoch": int(checkpoint["epoch"])}
    train_loader = make_loader(splits.train, 256, 0, device)
    gallery_loader = make_loader(splits.gallery, 256, 0, device)
    codes, features = {}, {}
    for evaluation in EVALUATIONS:
        model = load_model(checkpoint, device)
        torch.manual_seed(0)  # the augmentation of "precise-aug"
        if evaluation == "precise":
            recompute_bn_statistics(model, gallery_loader, device, progress=False)
        elif evaluation == "precise-aug":
            recompute_bn_statistics(model, train_loader, device, progress=False)
        elif evaluation == "precise-head":
            recompute_bn_statistics(model.backbone.head, _head_inputs(model, gallery_loader,
                                                                       device), device,
                                    progress=False)
        out[f"mAP_{evaluation}"], codes[evaluation] = _evaluate(model, splits, args, device)
        if evaluation in ("stored", "precise"):
            features[evaluation], _ = extract_features(model, gallery_loader, device,
                                                       progress=False)
            out[f"margin_{evaluation}"] = _assignment_margins(model, features[evaluation])
            out[f"last_bn_{evaluation}"] = _last_bn_summary(model)
    out["codes_changed"] = (codes["stored"] != codes["precise"]).any(1).double().mean().item()
    # How far the stored statistics turn each sub-vector x_m away from the precise ones.
    model = load_model(checkpoint, device)
    books = model.quantizer.num_books if hasattr(model.quantizer, "num_books") else 1
    cos = F.cosine_similarity(features["stored"].unflatten(1, (books, -1)),
                              features["precise"].unflatten(1, (books, -1)), dim=-1)
    out["subvector_cos"] = {"mean": cos.mean().item(), "p10": cos.quantile(0.1).item()}
    return out


def _last_bn_summary(model) -> dict:
    """The face head's last BatchNorm1d (the features' own): mean |beta| against the mean
    normalised spread gamma (a large offset beta relative to gamma makes a sub-vector's
    direction depend on the running statistics), and its mean running variance."""
    last = model.backbone.head[-1]
    return {"beta_abs": last.bias.abs().mean().item(),
            "gamma_abs": last.weight.abs().mean().item(),
            "running_var": last.running_var.mean().item()}


def _head_inputs(model, loader, device) -> list[torch.Tensor]:
    """The final feature maps ``(B, C, h, w)`` of ``loader``, the face head's inputs."""
    maps = []
    with torch.no_grad(), fp32_zone():
        model.eval()
        for batch in loader:
            maps.append(model.backbone.stages(batch.images.to(device)))
    return maps


def _row(runs: list[dict], key: str) -> str:
    values = [100 * r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def write_table(records: dict, args, out: Path) -> Path:
    lines = [f"bf16 vs float32 on {args.dataset}, {args.len} bits, width {args.width}, "
             f"{args.epochs} epochs, seeds {' '.join(map(str, args.seeds))} "
             f"(mAP %, mean ± sd over seeds)", "",
             "| method | training | " + " | ".join(EVALUATIONS) + " | codes changed by precise BN "
             "| train s |", "| --- | --- |" + " --- |" * (len(EVALUATIONS) + 2)]
    for method in args.methods:
        for variant in args.variants:
            runs = [records[f"{method}_{variant}_seed{s}"] for s in args.seeds
                    if f"{method}_{variant}_seed{s}" in records]
            if not runs:
                continue
            cells = [_row(runs, f"mAP_{e}") for e in EVALUATIONS]
            changed = statistics.mean(r["codes_changed"] for r in runs)
            seconds = statistics.mean(r["train_seconds"] for r in runs)
            lines.append(f"| {method} | {variant} | " + " | ".join(cells)
                         + f" | {100 * changed:.1f}% | {seconds:.0f} |")
    path = out / f"amp_accuracy_{args.dataset}.md"
    path.write_text("\n".join(lines) + "\n")
    (out / f"amp_accuracy_{args.dataset}.json").write_text(json.dumps(records, indent=1))
    return path


def _splits(args):
    train_dir, test_dir = split_dirs(args.data_dir, args.dataset)
    return build_splits(train_dir, test_dir, 32, cache=dataset_preset(args.dataset).cache,
                        progress=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--methods", nargs="+", default=["opqn"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["off", "bf16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--len", type=int, default=24)
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--words", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--out", default="results/amp_accuracy")
    parser.add_argument("--reanalyse", action="store_true",
                        help="redo the analysis of finished runs from their checkpoints")
    args = parser.parse_args(argv)
    args.extra = extra
    device = torch.device("cpu")
    out = Path(args.out) / args.dataset
    (out / "runs").mkdir(parents=True, exist_ok=True)
    records: dict = {}
    splits = None
    total = len(args.methods) * len(args.variants) * len(args.seeds)
    for method in args.methods:
        for seed in args.seeds:
            for variant in args.variants:
                name = f"{method}_{variant}_seed{seed}"
                record_path = out / "runs" / f"{name}.json"
                flags = {"epochs": args.epochs, "len": args.len, "num": args.num,
                         "words": args.words, "width": args.width, "bs": args.bs,
                         "extra": extra}
                if record_path.is_file():
                    saved = json.loads(record_path.read_text())
                    if saved.get("flags") == flags and args.reanalyse:
                        splits = splits or _splits(args)
                        saved.update(analyse(out / "checkpoint" / f"{name}.tar", splits,
                                             args, device))
                        record_path.write_text(json.dumps(saved, indent=1))
                    if saved.get("flags") == flags:
                        records[name] = saved
                        print(f"[{len(records)}/{total}] {name}: reused", flush=True)
                        continue
                path, seconds = _train(args, method, variant, seed, out)
                splits = splits or _splits(args)
                record = {"method": method, "variant": variant, "seed": seed, "flags": flags,
                          "train_seconds": seconds, **analyse(path, splits, args, device)}
                record_path.write_text(json.dumps(record, indent=1))
                records[name] = record
                print(f"[{len(records)}/{total}] {name}: " + ", ".join(
                    f"{e} {100 * record[f'mAP_{e}']:.2f}%" for e in EVALUATIONS)
                    + f", codes changed {100 * record['codes_changed']:.1f}%, "
                      f"{seconds:.0f} s", flush=True)
    print(write_table(records, args, out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Results files: a JSON per evaluation, PR-curve plots, and the one-line summary."""
from __future__ import annotations

import json
import math
import platform
from datetime import datetime
from pathlib import Path
from typing import Sequence

import matplotlib
import torch

matplotlib.use("Agg")  # files only: no display is needed
import matplotlib.pyplot as plt  # noqa: E402

from models.methods import DEFAULT_METHOD, get_method, method_names  # noqa: E402
from utils.atomic_io import atomic_path, atomic_write_text  # noqa: E402

from .settings import DataSettings  # noqa: E402


def summary_line(result: dict) -> str:
    """One line with the headline numbers of an evaluation."""
    name = result.get("name") or result.get("dataset", "")
    method = result.get("method", DEFAULT_METHOD)
    if result["mAP"] is None:  # no query had a relevant gallery item
        scores = f"mAP undefined ({result.get('undefined_reason', 'no relevant items')})"
    else:
        scores = (f"mAP {100 * result['mAP']:.2f}%  P@{result['k']} "
                  f"{100 * result['precision_at_k']:.2f}%  R@{result['k']} "
                  f"{100 * result['recall_at_k']:.2f}%")
    trained = (f"  trained {result['train_precision']}" if result.get("train_precision")
               else "")
    return (f"[{name}] {method} {result['bits']}-bit ({result['num_books']}x"
            f"{result['num_words']}) {scores}{trained}  queries {result['num_queries']} "
            f"(skipped {result['skipped_queries']})  gallery {result['num_database']}  "
            f"encode {result['encode_seconds']:.1f}s  search {result['search_seconds']:.3f}s")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def curve_label(result: dict, name: str) -> str:
    """Legend entry of one model: checkpoint name, method (when the results name one), code
    and mAP, e.g. ``synthface_36bits: OPQN 36-bit (6x64), mAP 89.10%``: two models of the
    same length stay apart."""
    name_of = str(result.get("method") or DEFAULT_METHOD)
    spec = get_method(name_of) if name_of in method_names() else None
    # A hashing method's "books" are its L bits of 2 words each: the bit count says it all.
    code = "" if spec and spec.hashing else f" ({result['num_books']}x{result['num_words']})"
    method = spec.title if spec else name_of
    score = "mAP undefined" if result.get("mAP") is None else f"mAP {100 * result['mAP']:.2f}%"
    return f"{name}: {method} {result['bits']}-bit{code}, {score}"


def write_result(result: dict, out_dir: str | Path, stem: str,
                 title: str | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.json`` and its PR curve ``<out_dir>/<stem>_pr.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    png_path = out / f"{stem}_pr.png"
    atomic_write_text(json_path, json.dumps(_jsonable(result), indent=2) + "\n")
    plot_pr_curves([(curve_label(result, stem), result["pr_curve"])], png_path,
                   title=title or f"{result.get('dataset', '')}: precision-recall")
    return json_path, png_path


def plot_pr_curves(curves: Sequence[tuple[str, dict]], path: str | Path, title: str = "") -> Path:
    """Plot one or more ``(label, {"precision": [...], "recall": [...]})`` curves to a PNG."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=120)
    for label, curve in curves:
        if any(v is None for v in curve["precision"]):
            continue  # undefined: no query had a relevant item
        ax.plot(curve["recall"], curve["precision"], label=label, linewidth=1.6)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize="medium")
    if ax.lines:
        # Below the axes, so that it never hides a curve (low curves run along the bottom).
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small",
                  frameon=False)
    else:
        ax.text(0.5, 0.5, "undefined: no query has a relevant item", ha="center")
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def result_metadata(config, data: DataSettings, device: torch.device) -> dict:
    """What a result JSON records besides the metrics: the model's configuration
    (an ``NetConfig``), the dataset and protocol, and where and when it ran."""
    return {
        "method": config.method,
        "dataset": data.dataset,
        "cross_dataset": data.cross_dataset,
        "train_dataset": config.dataset,
        "bits": config.bits,
        "num_books": config.num_books,
        "num_words": config.num_words,
        "feature_dim": config.feature_dim,
        "input_size": config.input_size,
        "width": config.width,
        "backbone": config.backbone,
        "backbone_args": dict(config.backbone_args),
        "margin_type": config.margin_type,
        "device": str(device),
        "torch": torch.__version__,
        "host": platform.node(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def training_provenance(checkpoint: dict) -> dict:
    """How a checkpoint's model was trained, for its results: ``train_precision`` (bf16 or
    float32; None for checkpoints from before it was recorded) and ``precise_bn`` (the
    images its BatchNorm statistics were recomputed over, 0 when they were not)."""
    return {"train_precision": checkpoint.get("train_precision"),
            "precise_bn": int(checkpoint.get("precise_bn", {}).get("images", 0))}


def write_pr_comparison(curves: Sequence[tuple[str, dict]], out_dir: str | Path, dataset: str,
                        cross_dataset: bool) -> Path:
    """The PR curves of all models of one -e run in one figure,
    ``<dataset>[_cross]_pr_curves.png`` under ``out_dir``."""
    name = f"{dataset}{'_cross' if cross_dataset else ''}_pr_curves.png"
    title = (f"cross-dataset on {dataset} (unseen identities): {len(curves)} models"
             if cross_dataset else f"{dataset}: precision-recall of {len(curves)} models")
    return plot_pr_curves(curves, Path(out_dir) / name, title=title)

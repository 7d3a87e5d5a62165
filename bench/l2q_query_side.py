"""Why OPQN-l2q ranks poorly: the same l2q codes scored three ways.

Loads an l2q checkpoint, encodes a dataset's gallery (train split) and queries (test
split), and prints the mAP of

* the l2q score (``-sum_m ||s_m - c_k||^2`` with P_m from the normalised query, as the
  method is defined, i.e. what ``-e`` reports),
* OPQN's score ``sum_m P_m[code_m]`` over the same codes and P_m, and
* the distance score with P_m from the un-normalised query (as in training).

Usage: ``python bench/l2q_query_side.py CHECKPOINT --data-dir DIR [--dataset synthface]``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from data.loaders import build_splits, make_loader  # noqa: E402
from models.pq_ops import neg_sq_distance_tables, soft_vectors  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.evaluation import extract_features  # noqa: E402
from utils.retrieval import evaluate_adc  # noqa: E402
from utils.training import load_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--dataset", default="synthface")
    args = p.parse_args()
    cpu = torch.device("cpu")
    model = load_model(load_checkpoint(args.checkpoint), cpu)
    if model.config.method != "l2q":
        raise SystemExit(f"{args.checkpoint} holds a {model.config.method} model, not l2q")
    root = Path(args.data_dir) / args.dataset
    splits = build_splits(root / "train", root / "test", model.config.input_size,
                          with_train=False, cache=True, progress=False)
    gallery, g_labels = extract_features(model, make_loader(splits.gallery, 128, 0, cpu), cpu,
                                         progress=False)
    queries, q_labels = extract_features(model, make_loader(splits.queries, 128, 0, cpu), cpu,
                                         progress=False)
    head = model.quantizer
    codes = head.encode(gallery)
    books = head.codebooks.detach()
    p_norm = head.query_probs(queries)
    p_raw = torch.softmax(head.assignment_logits(head.split(queries)), -1)
    rows = {
        "l2q score (normalised query)": head.query_tables(queries),
        "OPQN score sum_m P_m[code]": p_norm,
        "distance, un-normalised query": neg_sq_distance_tables(soft_vectors(books, p_raw), books),
    }
    for name, tables in rows.items():
        print(f"{name:34s} mAP {100 * evaluate_adc(tables, codes, q_labels, g_labels)['mAP']:.2f}%")
    diag = head.diagnostics(queries)  # the training log's numbers, on the real queries
    print(f"mean max P_m (normalised query): {diag['maxP_q']:.4f} "
          f"(uniform: {1 / head.num_words:.4f}); codeword norms sd/mean {diag['norm_cv']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

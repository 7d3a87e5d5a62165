"""Why OPQN-l2q ranked poorly with its authors' evaluator: the same l2q codes scored three ways.

Loads an l2q checkpoint, encodes a dataset's gallery (train split) and queries (test
split), and prints the mAP of

* the authors' l2q score (``-sum_m ||s_m - c_k||^2`` with P_m from the normalised query,
  ``PqDistRet_Ortho_euclidean``; ``--l2q-query normalized``),
* OPQN's score ``sum_m P_m[code_m]`` over the same codes and normalised-query P_m, and
* the distance score with P_m from the un-normalised query, as in training (``--l2q-query
  raw``, the default since it was measured here).

and which of them ``-e`` reports for this checkpoint (its ``l2q_query``).

Usage: ``python -m bench.l2q_query_side CHECKPOINT --data-dir DIR [--dataset synthface]``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


from data.loaders import build_splits, make_loader  # noqa: E402
from models.pq_ops import neg_sq_distance_tables, soft_vectors  # noqa: E402
from utils.checkpoints.store import load_checkpoint  # noqa: E402
from utils.retrieval.encoding import extract_features  # noqa: E402
from utils.retrieval.adc import evaluate_adc  # noqa: E402
from utils.checkpoints.loading import load_model  # noqa: E402


@torch.no_grad()
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
    p_norm = torch.softmax(head.assignment_logits(F.normalize(head.split(queries), dim=-1)), -1)
    p_raw = torch.softmax(head.assignment_logits(head.split(queries)), -1)
    rows = {
        "normalized: distance, normalised query": neg_sq_distance_tables(
            soft_vectors(books, p_norm), books),
        "OPQN score sum_m P_m[code]": p_norm,
        "raw: distance, un-normalised query": neg_sq_distance_tables(
            soft_vectors(books, p_raw), books),
    }
    for name, tables in rows.items():
        print(f"{name:40s} mAP {100 * evaluate_adc(tables, codes, q_labels, g_labels)['mAP']:.2f}%")
    print(f"-e scores this checkpoint with --l2q-query {head.query_side}")
    for side, probs in (("normalised", p_norm), ("un-normalised", p_raw)):
        print(f"mean max P_m ({side} query): {probs.max(-1).values.mean():.4f} "
              f"(uniform: {1 / head.num_words:.4f})")
    norms = books.norm(dim=1)
    print(f"codeword norms sd/mean {norms.std() / norms.mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

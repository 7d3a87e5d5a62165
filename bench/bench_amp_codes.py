"""Gallery codes from bf16 against fp32 backbone inference, on a trained model.

    python -m bench.bench_amp_codes checkpoint/synthface_36bits.tar [--dataset synthface]

Encodes the dataset's gallery (its train split, test transform) twice with the same model:
backbone in float32, and backbone under bf16 autocast with channels_last (the quantization
head runs in float32 either way). Prints the share of items whose whole code agrees, the
share of agreeing book entries, and the retrieval mAP / P@k of both encodings with the same
fp32 query tables, and the encoding time of both (measured alternately in this run).
Target: at least 99% of the items keep their code.
"""
from __future__ import annotations

import argparse
import time


import torch  # noqa: E402

from data.datasets import dataset_preset, split_dirs  # noqa: E402
from data.loaders import build_splits, make_loader  # noqa: E402
from utils.checkpoints.store import load_checkpoint  # noqa: E402
from utils.retrieval.encoding import encode_gallery, encode_queries  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.retrieval.adc import evaluate_adc  # noqa: E402
from utils.checkpoints.loading import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", default="synthface")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    setup_logging(None, enabled=False)
    cpu = torch.device("cpu")
    checkpoint = load_checkpoint(args.checkpoint, map_location="cpu")
    model = load_model(checkpoint, cpu)
    preset = dataset_preset(args.dataset)
    train_dir, test_dir = split_dirs(args.data_dir, args.dataset, False)
    splits = build_splits(train_dir, test_dir, model.config.input_size, with_train=False,
                          cache=preset.cache, progress=False)
    gallery = make_loader(splits.gallery, args.batch, args.workers, cpu)
    queries = make_loader(splits.queries, args.batch, args.workers, cpu)
    tables, qlab = encode_queries(model, queries, cpu, progress=False, amp=False)
    codes, seconds = {}, {False: 0.0, True: 0.0}
    for amp in (False, True, False, True):  # alternate, keep the faster of two runs
        start = time.perf_counter()
        codes[amp], labels = encode_gallery(model, gallery, cpu, progress=False, amp=amp)
        took = time.perf_counter() - start
        seconds[amp] = took if not seconds[amp] else min(seconds[amp], took)
    same_item = (codes[True] == codes[False]).all(1).double().mean().item()
    same_entry = (codes[True] == codes[False]).double().mean().item()
    print(f"{args.checkpoint}: {codes[False].shape[0]:,} gallery items, "
          f"{model.config.num_books}x{model.config.num_words} codes")
    print(f"items with identical codes (bf16 vs fp32 backbone): {100 * same_item:.2f}%  "
          f"(book entries {100 * same_entry:.3f}%; target >= 99%)")
    for amp in (False, True):
        res = evaluate_adc(tables, codes[amp], qlab, labels, k=args.k)
        print(f"  {'bf16' if amp else 'fp32'} gallery: mAP {100 * res['mAP']:.2f}%  "
              f"P@{args.k} {100 * res['precision_at_k']:.2f}%  encode {seconds[amp]:.1f} s")


if __name__ == "__main__":
    main()

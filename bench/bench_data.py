"""Input-pipeline throughput: JPEG files vs the pre-decoded cache, against what training eats.

    python -m bench.bench_data [--quick] [--images N] [--workers W] [--width 64] [--batch 256]

It writes its own temporary folder of JPEGs (structured random faces-ish pictures of varied
sizes, one folder per identity), then measures, in images per second:

* ``jpeg``: ``data.datasets.FaceFolder`` with the per-sample training transform of
  ``data.transforms`` (decode, resize 35, random crop 32, flip, normalise) in a DataLoader
  with ``--workers`` processes;
* ``cache``: ``data.cache.CachedImageDataset`` over the same images pre-decoded at 35x35,
  with the same augmentation applied to the uint8 tensors (crop, flip, normalise), same
  DataLoader settings; the one-off build time is reported separately;
* ``train step``: forward + backward + SGD step of the project's backbone
  (``models.FaceResNet20``, or a stand-in 20-layer residual CNN if ``models`` is missing) at
  batch ``--batch`` on 32x32 inputs, i.e. the rate at which one training process consumes
  images on this machine.

The loaders and the model are timed separately, each with the whole CPU; in a real run they
share it. The target is cache >= 5x the training step's consumption.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader


from data.cache import CachedImageDataset, open_cache  # noqa: E402
from data.transforms import build_transform  # noqa: E402


def make_jpeg_folder(root: Path, n_images: int, n_ids: int, seed: int = 0) -> None:
    """``n_images`` JPEGs under ``root/<identity>/``: smooth colour blobs plus noise, sides
    60..250 px, a quarter of them non-square."""
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        ident = root / f"id{i % n_ids:04d}"
        ident.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(60, 251))
        h, w = (side, side) if rng.random() < 0.75 else (side, int(side * rng.uniform(0.7, 1.4)))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.2, 0.6) * side
            img[..., c] = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(ident / f"{i:06d}.jpg",
                                                                     quality=90)


def loader_rate(dataset, batch: int, workers: int, epochs: int, collate=None) -> float:
    """Images per second over ``epochs`` epochs, not counting the first batch (start-up)."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=False, collate_fn=collate, persistent_workers=workers > 0)
    seen, start = 0, None
    for _ in range(epochs):
        for images, *_rest in loader:
            if start is None:
                start = time.perf_counter()  # clock starts once the pipeline is running
                continue
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


class _Unit(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.PReLU(ch),
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.PReLU(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def standin_resnet20(width: int, feature_dim: int = 512) -> nn.Module:
    """SphereFace-20-shaped CNN for 32x32 inputs, used only if ``models`` is unavailable."""
    layers: list[nn.Module] = []
    in_ch = 3
    for mult, stride, units in ((1, 1, 1), (2, 2, 2), (4, 2, 4), (8, 2, 1)):
        ch = width * mult
        layers += [nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False), nn.BatchNorm2d(ch),
                   nn.PReLU(ch)] + [_Unit(ch) for _ in range(units)]
        in_ch = ch
    return nn.Sequential(*layers, nn.Flatten(), nn.BatchNorm1d(in_ch * 16), nn.Dropout(0.5),
                         nn.Linear(in_ch * 16, feature_dim), nn.BatchNorm1d(feature_dim))


def train_step_rate(width: int, batch: int, steps: int) -> tuple[float, str]:
    """Images per second consumed by SGD training steps at ``batch`` (after one warm-up)."""
    try:
        from models import FaceResNet20
        model: nn.Module = FaceResNet20(512, input_size=32, width=width)
        name = f"models.FaceResNet20(width={width})"
    except ImportError:
        model, name = standin_resnet20(width), f"stand-in ResNet-20 (width={width})"
    classifier = nn.Linear(512, 500)  # a stand-in for the OPQN loss head
    params = list(model.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 500, (batch,))
    model.train()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(classifier(model(x)), y)
        loss.backward()
        opt.step()
        if i:  # the first step allocates and warms up
            times.append(time.perf_counter() - t0)
    return batch / float(np.median(times)), name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images, epochs and steps")
    p.add_argument("--images", type=int, default=None, help="default 2000 (quick: 600)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, nargs="+", default=None,
                   help="backbone widths to time (64 = paper, 16 = narrow CPU variant); "
                        "default 64 16 (quick: 16)")
    p.add_argument("--keep", default=None, help="keep the generated folder here")
    args = p.parse_args(argv)
    n_images = args.images or (600 if args.quick else 2000)
    steps = 1 if args.quick else 3
    widths = args.width or ([16] if args.quick else [64, 16])
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), torch threads "
          f"{torch.get_num_threads()}, loader workers {args.workers}, batch {args.batch}")

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        root = tmp / "train"
        t0 = time.perf_counter()
        make_jpeg_folder(root, n_images, n_ids=max(1, n_images // 40))
        print(f"generated {n_images} JPEGs in {time.perf_counter() - t0:.1f}s under {root}")

        from data.datasets import FaceFolder, collate_skip_broken
        jpeg_ds = FaceFolder(root, transform=build_transform(32, train=True))
        jpeg = loader_rate(jpeg_ds, args.batch, args.workers, 1, collate_skip_broken)
        print(f"jpeg  loader: {jpeg:9.0f} img/s  (decode+resize 35+crop 32+flip+normalise)")

        t0 = time.perf_counter()
        cache = open_cache(root, 35, rebuild=True, progress=False)
        build = time.perf_counter() - t0
        print(f"cache build : {build:9.2f} s  ({len(cache) / build:.0f} img/s, once)")
        cache_ds = CachedImageDataset(cache, build_transform(32, train=True, resized=True))
        cached = loader_rate(cache_ds, args.batch, args.workers, 2 if args.quick else 4)
        print(f"cache loader: {cached:9.0f} img/s  (uint8 35x35 + crop 32+flip+normalise)")

        for width in widths:
            consume, name = train_step_rate(width, args.batch, steps)
            print(f"train step  : {consume:9.0f} img/s  ({name}, batch {args.batch}, "
                  f"{args.batch / consume:.2f} s/step)")
            print(f"  ratio cache/consumption = {cached / consume:.1f}x "
                  f"(target >= 5x: {'met' if cached >= 5 * consume else 'NOT met'}); "
                  f"jpeg/consumption = {jpeg / consume:.1f}x")
        print(f"ratio cache/jpeg = {cached / jpeg:.1f}x")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

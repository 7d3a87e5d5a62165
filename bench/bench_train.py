"""Training throughput: the bare model step against the real data loader and loop.

    python bench/bench_train.py                      # paper's 32x32 backbone, batch 64, CPU
    python bench/bench_train.py --input-size 112     # the VGGFace2 / cross-dataset network
    python bench/bench_train.py --backbone sphere20 edgenext_x_small resnet18 --no-loop
                                                     # per-backbone FLOPs, parameters, images/s

Prints images/s and achieved GFLOP/s (3x the forward FLOPs per image: forward plus the two
backward products) for (1) the bare step on tensors already in memory and (2) a full
epoch of the real loop (``utils.training.train``) reading synthface PNGs through the
DataLoader, and the loop's overhead over the bare step (target: at most 10%).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data.loaders import build_splits  # noqa: E402
from data.synthface import ensure_synthface  # noqa: E402
from models import OPQN, OPQNConfig, choose_feature_dim, count_flops, count_parameters  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.runtime import resolve_device  # noqa: E402
from utils.training import OPQNTrainingModule, TrainSettings, build_criterion, train  # noqa: E402


def bare_step_rate(config: OPQNConfig, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of forward + loss + backward + SGD step on a fixed in-memory batch."""
    model = OPQN(config).to(device)
    module = OPQNTrainingModule(model, build_criterion(config).to(device)).train()
    use_amp = device.type == "cuda"
    if use_amp:
        module = module.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    size = config.input_size
    images = torch.randn(batch, 3, size, size, device=device)
    if use_amp:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, config.num_classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, _ = module(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def loop_rate(config: OPQNConfig, batch: int, steps: int, workers: int, device: torch.device,
              data_dir: Path, cache: bool) -> float:
    """Images/s of the second epoch of the real training loop over synthface PNGs (or their
    pre-decoded cache)."""
    per_identity = 16
    identities = -(-batch * steps // per_identity)
    root = ensure_synthface(data_dir, num_identities=identities,
                            train_per_identity=per_identity, test_per_identity=1,
                            cross_identities=2, progress=False)
    splits = build_splits(root / "train", root / "test", config.input_size, cache=cache,
                          progress=False)
    config.num_classes = splits.num_classes
    settings = TrainSettings(epochs=2, batch_size=batch, workers=workers, eval_every=0,
                             best_path=data_dir / "bench.tar", last_path=data_dir / "bench.last.tar",
                             progress=False)
    state = train(config, settings, splits, device)
    record = state.history[-1]
    images = (len(splits.train) // batch) * batch
    return images / record["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input-size", type=int, default=32, choices=(32, 112))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--width", type=int, default=64, help="64 = the paper's network")
    parser.add_argument("--num", type=int, default=6)
    parser.add_argument("--words", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", nargs="+", default=["sphere20"], metavar="NAME",
                        help="backbone(s) to measure: sphere20 (--width applies) or timm names")
    parser.add_argument("--no-loop", action="store_true",
                        help="measure only the bare step, not the real loop over files")
    args = parser.parse_args()
    device = resolve_device(args.device)
    setup_logging(None, enabled=False)
    dim = choose_feature_dim(args.num, args.words, args.input_size)
    rows = []
    for backbone in args.backbone:
        config = OPQNConfig(args.num, args.words, dim, num_classes=100,
                            input_size=args.input_size, width=args.width,
                            scale=20.0 if args.input_size == 32 else 40.0, backbone=backbone)
        rows.append((backbone, *measure_backbone(args, config, device)))
    if len(rows) > 1:
        base = rows[0][3]
        print(f"\n| backbone | input | GFLOP/image (forward) | parameters (M) | train images/s "
              f"| vs {rows[0][0]} |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, gflop, params, rate in rows:
            print(f"| {name} | {args.input_size} | {gflop:.3f} | {params:.2f} | {rate:.1f} | "
                  f"{rate / base:.2f}x |")


def measure_backbone(args: argparse.Namespace, config: OPQNConfig,
                     device: torch.device) -> tuple[float, float, float]:
    """Print FLOPs, parameters and training images/s of ``config``'s backbone; returns
    (forward GFLOP per image, parameters in millions, bare-step images/s)."""
    """Print FLOPs, parameters and training images/s of ``config``'s backbone."""
    net = OPQN(config).backbone
    forward_gflop = count_flops(net) / 1e9  # torch.utils.flop_counter.FlopCounterMode
    params = count_parameters(net) / 1e6
    gflop = 3 * forward_gflop  # per training image
    print(f"backbone {config.backbone}: {forward_gflop:.3f} GFLOP per image (forward), "
          f"{params:.2f} M parameters, input {config.input_size}, final map "
          f"{'x'.join(map(str, net.map_shape))}, D {config.feature_dim}")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"input {args.input_size}, width {args.width}, batch {args.batch}, "
          f"{gflop:.2f} GFLOP per training image")
    bare = bare_step_rate(config, args.batch, args.steps, device)
    print(f"bare step : {bare:9.1f} images/s  {bare * gflop:8.1f} GFLOP/s")
    if args.no_loop:
        return forward_gflop, params, bare
    with tempfile.TemporaryDirectory() as tmp:
        for cache, source in ((False, "PNG files"), (True, "uint8 cache")):
            loop = loop_rate(config, args.batch, args.steps, args.workers, device, Path(tmp),
                             cache)
            print(f"real loop : {loop:9.1f} images/s  {loop * gflop:8.1f} GFLOP/s "
                  f"({source}, DataLoader with {args.workers} workers); overhead over the "
                  f"bare step {100 * (bare / loop - 1):+.1f}% (target <= 10%)")
    return forward_gflop, params, bare


if __name__ == "__main__":
    main()

"""Training throughput: fp32 against bf16 autocast + channels_last, and the real loop.

    python -m bench.bench_train                        # fp32 vs bf16: the three rows below
    python -m bench.bench_train --input-size 32        # one configuration: bare step + loop
    python -m bench.bench_train --input-size 112 --device cuda --batch 256 [--compile]
    python -m bench.bench_train --backbone sphere20 edgenext_x_small resnet18 --input-size 32
                                                       # per backbone: FLOPs, parameters, img/s

Without ``--input-size`` it times one training step (forward, loss, backward, SGD) on random
tensors for three rows: paper width 64 at 32x32 batch 64, narrow width 16 at 32x32 batch
64, and width 64 at 112x112 batch 32, each in fp32 and with bf16 autocast + channels_last
(the quantization head and the loss stay fp32, as in training).  The two precisions are
timed alternately, several rounds, in one run, and the best round of each is kept, so that
load from other processes hits both alike.

With ``--input-size`` it prints images/s and achieved GFLOP/s (3x the forward FLOPs per
image) of the bare step in both precisions and of a full epoch of the real loop
(``utils.training.loop.train``, with ``--amp``) reading synthface PNGs and the uint8 cache
through the DataLoader, and the loop's overhead over the bare step.

With ``--backbone NAME...`` it prints, per backbone at ``--input-size`` (default 32), the
forward GFLOP per image (``torch.utils.flop_counter.FlopCounterMode``), the parameters, the
final feature map and the bare-step images/s in the precision of ``--amp``, then a table of
ratios against the first backbone.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


import torch  # noqa: E402

from data.loaders import build_splits  # noqa: E402
from data.synthface import ensure_synthface  # noqa: E402
from models import (NetConfig, RetrievalNet, choose_feature_dim, count_flops,  # noqa: E402
                    count_parameters)
from utils.logger import setup_logging  # noqa: E402
from utils.precision import autocast, cpu_bf16_hardware, resolve_amp  # noqa: E402
from utils.runtime import resolve_device  # noqa: E402
from utils.training.loop import OPQNTrainingModule, TrainSettings, build_criterion, train  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(config: NetConfig, batch: int, device: torch.device, amp: bool,
              compile_model: bool = False):
    """A closure running one training step on a fixed in-memory batch."""
    torch.manual_seed(0)
    model = RetrievalNet(config).to(device)
    module = OPQNTrainingModule(model, build_criterion(config).to(device)).train()
    if amp:
        module = module.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    size = config.input_size
    images = torch.randn(batch, 3, size, size, device=device)
    if amp:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, config.num_classes, (batch,), device=device)
    forward = torch.compile(module) if compile_model else module

    def step() -> None:
        with autocast(device, amp):
            loss, _ = forward(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync(device)
    return step


def timed_rate(step, batch: int, steps: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def bare_step_rate(config: NetConfig, batch: int, steps: int, device: torch.device,
                   amp: bool = False, compile_model: bool = False) -> float:
    """Images/s of forward + loss + backward + SGD step on a fixed in-memory batch."""
    return timed_rate(make_step(config, batch, device, amp, compile_model), batch, steps, device)


def compare_precisions(rows, steps: int, rounds: int, device: torch.device,
                       compile_model: bool) -> None:
    """fp32 vs bf16 + channels_last per row, timed alternately; best round of each."""
    print(f"{'backbone':<34} {'fp32 img/s':>11} {'bf16+CL img/s':>14} {'ratio':>6}")
    for name, config, batch in rows:
        steps_fp32 = make_step(config, batch, device, False, compile_model)
        steps_bf16 = make_step(config, batch, device, True, compile_model)
        best = {False: 0.0, True: 0.0}
        for _ in range(rounds):
            best[False] = max(best[False], timed_rate(steps_fp32, batch, steps, device))
            best[True] = max(best[True], timed_rate(steps_bf16, batch, steps, device))
        print(f"{name:<34} {best[False]:11.1f} {best[True]:14.1f} "
              f"{best[True] / best[False]:5.2f}x", flush=True)


def loop_rate(config: NetConfig, batch: int, steps: int, workers: int, device: torch.device,
              data_dir: Path, cache: bool, amp: str = "auto") -> float:
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
                             progress=False, amp=amp)
    state = train(config, settings, splits, device)
    record = state.history[-1]
    images = (len(splits.train) // batch) * batch
    return images / record["seconds"]


def _config(num: int, words: int, input_size: int, width: int,
            backbone: str = "sphere20") -> NetConfig:
    dim = choose_feature_dim(num, words, input_size)
    return NetConfig(num, words, dim, num_classes=100, input_size=input_size, width=width,
                      scale=20.0 if input_size == 32 else 40.0, backbone=backbone)


def compare_backbones(args: argparse.Namespace, device: torch.device) -> None:
    """FLOPs, parameters, final map and bare-step images/s per backbone, in one run."""
    size = args.input_size or 32
    amp = resolve_amp(args.amp, device)
    rows = []
    for name in args.backbone:
        config = _config(args.num, args.words, size, args.width, name)
        net = RetrievalNet(config).backbone
        gflop = count_flops(net) / 1e9
        params = count_parameters(net) / 1e6
        rate = bare_step_rate(config, args.batch, args.steps, device, amp, args.compile)
        shape = "x".join(map(str, net.map_shape))
        print(f"backbone {name}: input {size}, final map {shape}, {gflop:.3f} GFLOP per image "
              f"(forward), {params:.2f} M parameters, {rate:.1f} training images/s "
              f"({'bf16' if amp else 'fp32'}, batch {args.batch})", flush=True)
        rows.append((name, shape, gflop, params, rate))
    base = rows[0][4]
    print(f"\n| backbone | input | final map | GFLOP/image (forward) | parameters (M) | "
          f"train images/s | vs {rows[0][0]} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shape, gflop, params, rate in rows:
        print(f"| {name} | {size} | {shape} | {gflop:.3f} | {params:.2f} | {rate:.1f} | "
              f"{rate / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input-size", type=int, choices=(32, 112),
                        help="one configuration (bare step and real loop) instead of the "
                             "three-row precision table")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per precision in the table (best kept)")
    parser.add_argument("--width", type=int, default=64, help="64 = the paper's network")
    parser.add_argument("--num", type=int, default=6)
    parser.add_argument("--words", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                        help="precision of the real loop (default auto, as opqn_main.py)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training module of the bare step")
    parser.add_argument("--backbone", nargs="+", metavar="NAME",
                        help="compare backbones (sphere20, where --width applies, or timm "
                             "names): FLOPs, parameters, bare-step images/s")
    args = parser.parse_args()
    device = resolve_device(args.device)
    setup_logging(None, enabled=False)
    print(f"device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU bf16 hardware "
          f"{cpu_bf16_hardware()}"
          f"{', torch.compile' if args.compile else ''}")
    if args.backbone:
        compare_backbones(args, device)
        return
    if args.input_size is None:
        rows = [("paper width 64, 32x32, batch 64", _config(args.num, args.words, 32, 64), 64),
                ("narrow width 16, 32x32, batch 64", _config(args.num, args.words, 32, 16), 64),
                ("paper width 64, 112x112, batch 32", _config(8, 256, 112, 64), 32)]
        compare_precisions(rows, args.steps, args.rounds, device, args.compile)
        return
    config = _config(args.num, args.words, args.input_size, args.width)
    gflop = 3 * count_flops(RetrievalNet(config).backbone) / 1e9  # per training image
    amp = resolve_amp(args.amp, device)
    print(f"input {args.input_size}, width {args.width}, batch {args.batch}, "
          f"{gflop:.2f} GFLOP per training image, real loop in {'bf16' if amp else 'fp32'}")
    bare = {}
    for use in (False, True):
        bare[use] = bare_step_rate(config, args.batch, args.steps, device, use, args.compile)
        print(f"bare step {'bf16+CL' if use else 'fp32   '}: {bare[use]:9.1f} images/s  "
              f"{bare[use] * gflop:8.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for cache, source in ((False, "PNG files"), (True, "uint8 cache")):
            loop = loop_rate(config, args.batch, args.steps, args.workers, device, Path(tmp),
                             cache, args.amp)
            print(f"real loop : {loop:9.1f} images/s  {loop * gflop:8.1f} GFLOP/s "
                  f"({source}, DataLoader with {args.workers} workers); overhead over the "
                  f"bare step {100 * (bare[amp] / loop - 1):+.1f}% (target <= 10%)", flush=True)


if __name__ == "__main__":
    main()

"""The OPQN training loop: SGD with step decay (or cosine, utils.schedules), monitoring every
few epochs, and atomic checkpoints of the last epoch and of the lowest training loss (as the
paper kept)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from data.datasets import MONITOR_TOP_K, report_broken
from data.loaders import RetrievalSplits, make_loader
from losses import build_loss
from models import OPQN, OPQNConfig

from .checkpoint import (CheckpointError, capture_rng_state, load_checkpoint,
                         restore_rng_state, save_checkpoint)
from .errors import first_line
from .evaluation import evaluate_model
from .logger import get_logger
from .precision import autocast, resolve_amp, run_fp32, to_memory_format
from .runtime import DistInfo, accumulator_dtype
from .schedules import build_scheduler
from .validation import UsageError


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``resumable``: a last checkpoint exists to ``--resume`` from."""

    def __init__(self, resumable: bool) -> None:
        super().__init__("interrupted")
        self.resumable = resumable
# BatchNorm in training mode needs two samples per channel; a batch with fewer readable
# images is skipped (on every rank together).
MIN_STEP_BATCH = 2


def check_per_rank_batch(batch_size: int, world_size: int) -> int:
    """The per-process batch of a run; a clear error when it falls below 2."""
    per_rank = batch_size // max(1, world_size)
    if per_rank < MIN_STEP_BATCH:
        raise UsageError(
            f"--bs {batch_size} over {world_size} process(es) leaves {per_rank} image(s) "
            f"per process; BatchNorm needs at least {MIN_STEP_BATCH} per process (use --bs "
            f">= {MIN_STEP_BATCH * max(1, world_size)})")
    return per_rank


@dataclass
class TrainSettings:
    """Optimisation and bookkeeping settings of one training run."""

    epochs: int
    lr: float = 0.1
    lr_step: int = 35
    lr_decay: float = 0.5
    schedule: str = "step"  # "step" (the paper's halving) or "cosine" (utils.schedules)
    warmup: int = 0  # cosine only: linear warmup epochs
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam" (amsgrad; DCDH on 32x32 sets)
    workers: int = 2
    seed: int = 0
    eval_every: int = 5
    monitor_k: int = MONITOR_TOP_K
    best_path: Path = Path("checkpoint/model.tar")
    last_path: Path = Path("checkpoint/model.last.tar")
    resume: bool = False
    progress: bool = True
    amp: str = "auto"  # bf16 autocast for the backbone (utils.precision.resolve_amp)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["best_path"], data["last_path"] = str(self.best_path), str(self.last_path)
        return data


class OPQNTrainingModule(nn.Module):
    """Model and loss head in one module, so that DDP synchronises both."""

    def __init__(self, model: OPQN, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # The one call site of head and loss for every method. Mixed precision stops at the
        # features: head and loss run in fp32 with autocast off, and the head's training
        # outputs go to the method's loss unchanged.
        outputs = run_fp32(self.model.quantizer, self.model(images))
        return run_fp32(self.criterion, *outputs, labels)


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_loss: float = math.inf
    best_epoch: int = 0
    history: list = field(default_factory=list)


# The loss module's state_dict (the class weights W_m) is saved under "criterion";
# checkpoints written before the rename hold it under "class_weights".
CRITERION_KEY = "criterion"
_LEGACY_CRITERION_KEY = "class_weights"


def criterion_state(checkpoint: dict) -> dict | None:
    """The loss module's state_dict of a checkpoint (old or new key), or None."""
    if CRITERION_KEY in checkpoint:
        return checkpoint[CRITERION_KEY]
    return checkpoint.get(_LEGACY_CRITERION_KEY)


def build_criterion(config: OPQNConfig) -> nn.Module:
    """The loss of the config's method (losses.build_loss)."""
    return build_loss(config)


def build_optimizer(params, settings: "TrainSettings") -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), or Adam with amsgrad (DCDH's on 32x32 sets)."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                amsgrad=True)
    if settings.optimizer != "sgd":
        raise ValueError(f"unknown optimizer {settings.optimizer!r}")
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def checkpoint_state(config: OPQNConfig, model: OPQN, criterion: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
                     settings: TrainSettings, classes: list[str]) -> dict:
    """Everything needed to evaluate or resume, as plain tensors and primitives."""
    return {
        "config": config.to_dict(),
        "backbone": model.backbone.state_dict(),
        "quantizer": model.quantizer.state_dict(),
        CRITERION_KEY: criterion.state_dict(),
        "epoch": state.epoch,
        "best_loss": state.best_loss,
        "best_epoch": state.best_epoch,
        "history": list(state.history),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "train_settings": settings.to_dict(),
        "classes": list(classes),
    }


def load_model(checkpoint: dict, device: torch.device) -> OPQN:
    """Rebuild the model of a checkpoint dict (from :func:`load_checkpoint`)."""
    config = OPQNConfig.from_dict(checkpoint["config"])
    model = OPQN(config)
    try:
        model.backbone.load_state_dict(checkpoint["backbone"])
        model.quantizer.load_state_dict(checkpoint["quantizer"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint weights do not match its configuration: "
                              f"{first_line(exc, limit=300)}") from None
    return model.to(device).eval()


# Short names of loss parts in the epoch log line (OPQN's as before).
_PART_LABELS = {"entropy": "H"}


def _epoch_seed(seed: int, epoch: int) -> int:
    # Every epoch draws from its own seed, so a resumed run repeats an uninterrupted one.
    return (seed * 1_000_003 + epoch * 7919) % 2**62


def _can_step(readable: int, device: torch.device, dist_info: DistInfo) -> bool:
    """Whether every rank holds at least ``MIN_STEP_BATCH`` readable images this step."""
    if not dist_info.distributed:
        return readable >= MIN_STEP_BATCH
    fewest = torch.tensor([readable], device=device, dtype=torch.int64)
    torch.distributed.all_reduce(fewest, op=torch.distributed.ReduceOp.MIN)
    return int(fewest.item()) >= MIN_STEP_BATCH


def _check_ranks_in_step(module: nn.Module, device: torch.device) -> None:
    """Fail clearly if the processes' parameters differ (they took different steps)."""
    with torch.no_grad():
        # Per parameter tensor: sum and sum of squares (float64), one tensor at a time.
        fingerprint = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                   for p in module.parameters()]).flatten().to(device)
    # Negated copy: one MAX all-reduce gives both the maximum and the minimum over ranks.
    both = torch.cat([fingerprint, -fingerprint])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(both[:fingerprint.numel()], -both[fingerprint.numel():]):
        raise RuntimeError("the training processes fell out of step: their parameters differ")


def train(config: OPQNConfig, settings: TrainSettings, splits: RetrievalSplits,
          device: torch.device, dist_info: DistInfo = DistInfo()) -> TrainState:
    """Train one OPQN model; returns the final bookkeeping state.

    Saves ``settings.last_path`` every epoch and ``settings.best_path`` whenever the mean
    training loss improves (rank 0 only). Raises :class:`TrainingDiverged` on a NaN/inf loss,
    leaving the last good checkpoints in place.
    """
    log = get_logger()
    per_rank_batch = check_per_rank_batch(settings.batch_size, dist_info.world_size)
    use_amp = resolve_amp(settings.amp, device)
    torch.manual_seed(settings.seed)
    # --pretrained weights only start a fresh run; a resumed one loads its own.
    model = OPQN(config, load_pretrained=config.pretrained and not settings.resume).to(device)
    criterion = build_criterion(config).to(device)
    if use_amp:  # channels_last follows bf16 (fast convolution layouts on CPU and GPU)
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    module = OPQNTrainingModule(model, criterion)
    optimizer = build_optimizer(module.parameters(), settings)
    scheduler = build_scheduler(optimizer, settings.schedule, settings.epochs, settings.lr_step,
                                settings.lr_decay, settings.warmup)
    state = TrainState()

    if settings.resume:
        ckpt = load_checkpoint(settings.last_path, map_location=device)
        model.backbone.load_state_dict(ckpt["backbone"])
        model.quantizer.load_state_dict(ckpt["quantizer"])
        criterion_weights = criterion_state(ckpt)
        if criterion_weights is not None:
            criterion.load_state_dict(criterion_weights)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            restore_rng_state(ckpt["rng"])
        else:  # e.g. converted from the authors' format, which saved no class weights
            log.info("%s has no class weights (%s): starting a new class head and optimizer",
                     settings.last_path, ckpt.get("converted_from", "no training state"))
        state = TrainState(int(ckpt["epoch"]), float(ckpt["best_loss"]),
                           int(ckpt["best_epoch"]), list(ckpt["history"]))
        log.info("resumed from epoch %d (%s)", state.epoch, settings.last_path)

    train_module: nn.Module = module
    sampler = None
    if dist_info.distributed:
        train_module = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = DistributedSampler(splits.train, dist_info.world_size, dist_info.rank,
                                     shuffle=True, seed=settings.seed, drop_last=True)
    eval_loaders = None
    classes = list(splits.train.classes)

    epochs = tqdm(range(state.epoch, settings.epochs), desc="epochs", initial=state.epoch,
                  total=settings.epochs, disable=not (settings.progress and dist_info.is_main))
    for epoch in epochs:
        torch.manual_seed(_epoch_seed(settings.seed, epoch))
        generator = torch.Generator().manual_seed(_epoch_seed(settings.seed, epoch))
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = make_loader(splits.train, per_rank_batch, settings.workers, device,
                             shuffle=True, generator=generator, sampler=sampler, drop_last=True)
        train_module.train()
        start = time.perf_counter()
        # The loss and its parts (each loss names them in PARTS), summed over the batches.
        part_names = list(criterion.PARTS)
        total = torch.zeros(1 + len(part_names), device=device, dtype=accumulator_dtype(device))
        seen = 0
        skipped = torch.zeros(2, device=device, dtype=accumulator_dtype(device))  # batches, their images
        batches = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False,
                       disable=not (settings.progress and dist_info.is_main))
        for step, batch in enumerate(batches):
            report_broken(splits.train, batch.broken)
            if not _can_step(batch.labels.numel(), device, dist_info):
                # Fewer than 2 readable images here or on another rank: every rank skips
                # this step together, so all take the same optimiser steps.
                skipped += torch.tensor([1.0, batch.labels.numel()], device=device,
                                        dtype=torch.float64)
                continue
            images, labels = batch.images, batch.labels
            images = to_memory_format(images.to(device, non_blocking=True), use_amp)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, use_amp):
                loss, parts = train_module(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = labels.shape[0]
            total += n * torch.stack([loss.detach()] + [parts[p] for p in part_names]).to(
                total.dtype)
            seen += n
            if step % 20 == 0:
                batches.set_postfix(loss=f"{total[0].item() / seen:.4f}")
        if dist_info.distributed:
            counts = torch.tensor([seen], device=device, dtype=torch.float64)
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(skipped)
            seen = int(counts.item())
        if dist_info.distributed:
            _check_ranks_in_step(module, device)
        if skipped[0].item() and dist_info.is_main:
            # Every rank counted each skipped step once: report steps, not rank-batches.
            log.warning("epoch %d: skipped %d step(s) (%d readable image(s) unused) in all "
                        "processes, because a batch had fewer than %d readable images",
                        epoch + 1, int(skipped[0].item()) // dist_info.world_size,
                        int(skipped[1].item()), MIN_STEP_BATCH)
        if seen == 0:
            raise RuntimeError("no training batch could be read in this epoch")
        means = (total / seen).tolist()
        mean_loss = means[0]
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"training loss became {mean_loss} at epoch {epoch + 1}; stopped. The last "
                f"good checkpoint is {settings.last_path} (try a lower --lr)")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state.epoch = epoch + 1
        record = {"epoch": state.epoch, "loss": mean_loss,
                  **dict(zip(part_names, means[1:])),
                  "lr": lr, "seconds": time.perf_counter() - start}
        improved = mean_loss < state.best_loss
        if improved:
            state.best_loss, state.best_epoch = mean_loss, state.epoch

        if settings.eval_every and state.epoch % settings.eval_every == 0 and dist_info.is_main:
            if eval_loaders is None:
                eval_loaders = (
                    make_loader(splits.gallery, settings.batch_size, settings.workers, device),
                    make_loader(splits.queries, settings.batch_size, settings.workers, device))
            result, _, _ = evaluate_model(model, *eval_loaders, device, k=settings.monitor_k,
                                          progress=settings.progress)
            record["monitor_mAP"] = result["mAP"]
            record[f"monitor_precision_at_{settings.monitor_k}"] = result["precision_at_k"]
        state.history.append(record)

        detail = " ".join(f"{_PART_LABELS.get(p, p)} {v:.3f}" for p, v in zip(part_names, means[1:]))
        line = (f"epoch {state.epoch}/{settings.epochs}  loss {mean_loss:.4f} ({detail})  "
                f"lr {lr:.4g}  {record['seconds']:.1f}s")
        if record.get("monitor_mAP") is not None:
            line += (f"  [monitor] mAP {100 * record['monitor_mAP']:.2f}%  "
                     f"P@{settings.monitor_k} "
                     f"{100 * record[f'monitor_precision_at_{settings.monitor_k}']:.2f}%")
        if dist_info.is_main:
            log.info(line)
            ckpt = checkpoint_state(config, model, criterion, optimizer, scheduler, state,
                                    settings, classes)
            if improved:
                save_checkpoint(ckpt, settings.best_path)
            save_checkpoint(ckpt, settings.last_path)
        epochs.set_postfix(loss=f"{mean_loss:.4f}")
    epochs.close()
    return state

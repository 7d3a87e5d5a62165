"""The OPQN training loop: SGD with step decay (or cosine, utils.training.schedules),
monitoring every few epochs, and atomic checkpoints of the last epoch and of the lowest
training loss (as the paper kept).

:func:`train` reads as the procedure: :func:`build_run` (model, loss, optimiser, schedule),
:func:`restore_run` under ``--resume``, :func:`distribute` under torchrun, then per epoch
:func:`train_epoch`, the scheduler step, the monitoring evaluation and :func:`save_run`."""
from __future__ import annotations

import copy
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
from models.methods import build_loss
from models import RetrievalNet, NetConfig
from utils.checkpoints.loading import load_model
from utils.checkpoints.store import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from utils.errors import UsageError
from utils.logger import get_logger
from utils.precision import (
    autocast,
    precision_name,
    resolve_amp,
    run_fp32,
    to_memory_format,
)
from utils.retrieval.encoding import evaluate_model
from utils.retrieval.scoring import NonFiniteTablesError
from utils.runtime import DistInfo, accumulator_dtype

from .precise_bn import (DEFAULT_PRECISE_BN_IMAGES, precise_bn_subset,
                         recompute_bn_statistics)
from .schedules import build_scheduler


class TrainingDiverged(RuntimeError):
    """The loss, or the model's outputs, became NaN or infinite."""


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
    schedule: str = "step"  # "step" (the paper's halving) or "cosine" (utils.training.schedules)
    warmup: int = 0  # cosine only: linear warmup epochs
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam" (GPQ; DCDH on 32x32 sets)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # adam only
    amsgrad: bool = True  # adam only
    workers: int = 2
    seed: int = 0
    eval_every: int = 5
    monitor_k: int = MONITOR_TOP_K
    best_path: Path = Path("checkpoint/model.tar")
    last_path: Path = Path("checkpoint/model.last.tar")
    resume: bool = False
    progress: bool = True
    amp: str = "auto"  # bf16 autocast for the backbone (utils.precision.resolve_amp)
    precise_bn: int = DEFAULT_PRECISE_BN_IMAGES  # images of precise BN after training; 0: off

    def to_dict(self) -> dict:
        data = asdict(self)
        data["best_path"], data["last_path"] = str(self.best_path), str(self.last_path)
        return data


class OPQNTrainingModule(nn.Module):
    """Model and loss head in one module, so that DDP synchronises both."""

    def __init__(self, model: RetrievalNet, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # The one call site of head and loss for every method. Mixed precision stops at the
        # features: head and loss run in fp32 with autocast off, and the head's training
        # outputs go to the method's loss unchanged.
        features = self.model(images)
        outputs = run_fp32(self.model.quantizer, features)
        loss, parts = run_fp32(self.criterion, *outputs, labels)
        # The head's diagnostics (e.g. l2q's query-side sharpness) join the logged parts.
        parts.update(run_fp32(self.model.quantizer.diagnostics, features.detach()))
        return loss, parts


def logged_parts(run: "TrainingRun") -> list[str]:
    """Names of the per-epoch scalars beside the loss: the loss's parts, then the head's
    diagnostics."""
    return [*run.criterion.PARTS, *run.model.quantizer.DIAGNOSTICS]


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


def build_criterion(config: NetConfig) -> nn.Module:
    """The loss of the config's method (models.methods.build_loss)."""
    return build_loss(config)


def build_optimizer(params, settings: "TrainSettings") -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), or Adam with the settings' betas and amsgrad (each
    method's defaults: its MethodSpec in models.methods)."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                betas=tuple(settings.adam_betas), amsgrad=settings.amsgrad)
    if settings.optimizer != "sgd":
        raise ValueError(f"unknown optimizer {settings.optimizer!r}")
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def checkpoint_state(config: NetConfig, model: RetrievalNet, criterion: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
                     settings: TrainSettings, classes: list[str], use_amp: bool) -> dict:
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
        "train_precision": precision_name(use_amp),
        "classes": list(classes),
    }


# Short names of loss parts in the epoch log line (OPQN's as before).
_PART_LABELS = {"entropy": "H"}


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle and augmentation: every epoch draws from its own
    seed, so a resumed run repeats an uninterrupted one."""
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


@dataclass
class TrainingRun:
    """What one training run updates: the model, its loss head (the class weights W_m),
    both in one module for DDP, the optimiser and its learning-rate schedule."""

    model: RetrievalNet
    criterion: nn.Module
    module: OPQNTrainingModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    use_amp: bool


def build_run(config: NetConfig, settings: TrainSettings, device: torch.device) -> TrainingRun:
    """Model, loss, optimiser and schedule of a fresh run, seeded with ``settings.seed``."""
    use_amp = resolve_amp(settings.amp, device, config.method, settings.precise_bn > 0)
    torch.manual_seed(settings.seed)
    # --pretrained weights only start a fresh run; a resumed one loads its own.
    model = RetrievalNet(config,
                         load_pretrained=config.pretrained and not settings.resume).to(device)
    criterion = build_criterion(config).to(device)
    if use_amp:  # channels_last follows bf16 (fast convolution layouts on CPU and GPU)
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    module = OPQNTrainingModule(model, criterion)
    optimizer = build_optimizer(module.parameters(), settings)
    scheduler = build_scheduler(optimizer, settings.schedule, settings.epochs, settings.lr_step,
                                settings.lr_decay, settings.warmup)
    return TrainingRun(model, criterion, module, optimizer, scheduler, use_amp)


def restore_run(run: TrainingRun, path: Path, device: torch.device) -> TrainState:
    """Load the last checkpoint ``path`` into ``run`` (weights, optimiser, schedule, random
    state) and return its bookkeeping, so that the run continues where it stopped."""
    ckpt = load_checkpoint(path, map_location=device)
    run.model.backbone.load_state_dict(ckpt["backbone"])
    run.model.quantizer.load_state_dict(ckpt["quantizer"])
    criterion_weights = criterion_state(ckpt)
    if criterion_weights is not None:
        run.criterion.load_state_dict(criterion_weights)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng_state(ckpt["rng"])
    else:  # e.g. converted from the authors' format, which saved no class weights
        get_logger().info("%s has no class weights (%s): starting a new class head and "
                          "optimizer", path, ckpt.get("converted_from", "no training state"))
    state = TrainState(int(ckpt["epoch"]), float(ckpt["best_loss"]), int(ckpt["best_epoch"]),
                       list(ckpt["history"]))
    get_logger().info("resumed from epoch %d (%s)", state.epoch, path)
    return state


def distribute(run: TrainingRun, train_set, seed: int, device: torch.device,
               dist_info: DistInfo) -> tuple[nn.Module, DistributedSampler | None]:
    """The module the steps call (DDP-wrapped across processes) and the sampler that gives
    each process its share of the training set (None in one process)."""
    if not dist_info.distributed:
        return run.module, None
    wrapped = DistributedDataParallel(
        run.module, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(train_set, dist_info.world_size, dist_info.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    return wrapped, sampler


@dataclass
class _EpochSums:
    """The loss and its parts summed over an epoch's images; the steps skipped."""

    total: Tensor  # (1 + parts,): loss, then each of logged_parts(), times images
    seen: int
    skipped: Tensor  # (2,): skipped batches, their readable images
    first_step_loss: float | None = None  # the loss of the epoch's first step, before it


def _run_steps(run: TrainingRun, train_module: nn.Module, loader, train_set, epoch: int,
               settings: TrainSettings, device: torch.device,
               dist_info: DistInfo) -> _EpochSums:
    """One SGD step per batch of ``loader``; a batch with too few readable images (here or
    on another rank) is skipped by every rank together."""
    part_names = logged_parts(run)
    sums = _EpochSums(
        torch.zeros(1 + len(part_names), device=device, dtype=accumulator_dtype(device)), 0,
        torch.zeros(2, device=device, dtype=accumulator_dtype(device)))
    batches = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False,
                   disable=not (settings.progress and dist_info.is_main))
    for step, batch in enumerate(batches):
        report_broken(train_set, batch.broken)
        if not _can_step(batch.labels.numel(), device, dist_info):
            # Fewer than 2 readable images here or on another rank: every rank skips
            # this step together, so all take the same optimiser steps.
            sums.skipped += torch.tensor([1.0, batch.labels.numel()], device=device,
                                         dtype=torch.float64)
            continue
        images = to_memory_format(batch.images.to(device, non_blocking=True), run.use_amp)
        labels = batch.labels.to(device, non_blocking=True)
        with autocast(device, run.use_amp):
            loss, parts = train_module(images, labels)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        n = labels.shape[0]
        if sums.first_step_loss is None:
            sums.first_step_loss = loss.item()
        sums.total += n * torch.stack([loss.detach()] + [parts[p] for p in part_names]).to(
            sums.total.dtype)
        sums.seen += n
        if step % 20 == 0:
            batches.set_postfix(loss=f"{sums.total[0].item() / sums.seen:.4f}")
    return sums


def _epoch_means(run: TrainingRun, sums: _EpochSums, epoch: int, settings: TrainSettings,
                 device: torch.device, dist_info: DistInfo) -> list[float]:
    """The epoch's mean loss and parts over all processes (which must still agree)."""
    seen = sums.seen
    if dist_info.distributed:
        counts = torch.tensor([seen], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(sums.total)
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(sums.skipped)
        seen = int(counts.item())
        _check_ranks_in_step(run.module, device)
    if sums.skipped[0].item() and dist_info.is_main:
        # Every rank counted each skipped step once: report steps, not rank-batches.
        get_logger().warning(
            "epoch %d: skipped %d step(s) (%d readable image(s) unused) in all processes, "
            "because a batch had fewer than %d readable images", epoch + 1,
            int(sums.skipped[0].item()) // dist_info.world_size, int(sums.skipped[1].item()),
            MIN_STEP_BATCH)
    if seen == 0:
        raise RuntimeError("no training batch could be read in this epoch")
    means = (sums.total / seen).tolist()
    if not math.isfinite(means[0]):
        raise TrainingDiverged(
            f"training loss became {means[0]} at epoch {epoch + 1}; stopped. The last "
            f"good checkpoint is {settings.last_path} (try a lower --lr)")
    return means


def train_epoch(run: TrainingRun, train_module: nn.Module, train_set, sampler,
                epoch: int, per_rank_batch: int, settings: TrainSettings,
                device: torch.device,
                dist_info: DistInfo) -> tuple[list[float], float | None]:
    """One pass over the training set (0-based ``epoch``, seeded by :func:`epoch_seed`);
    the mean loss and its parts, ``[loss, *logged_parts(run)]``, over all processes, and
    the loss of this rank's first step, taken before that step (None if none ran)."""
    torch.manual_seed(epoch_seed(settings.seed, epoch))
    generator = torch.Generator().manual_seed(epoch_seed(settings.seed, epoch))
    if sampler is not None:
        sampler.set_epoch(epoch)
    loader = make_loader(train_set, per_rank_batch, settings.workers, device,
                         shuffle=True, generator=generator, sampler=sampler, drop_last=True)
    train_module.train()
    sums = _run_steps(run, train_module, loader, train_set, epoch, settings, device, dist_info)
    return _epoch_means(run, sums, epoch, settings, device, dist_info), sums.first_step_loss


class _Monitor:
    """The evaluation every ``eval_every`` epochs (gallery = training split, as -e does);
    its loaders are built on first use.

    With precise BN on, each point evaluates a copy of the model whose BatchNorm statistics
    are recomputed as after training (utils.training.precise_bn, same images), so that the
    curve and the final evaluation measure the same thing; the training model is untouched.
    """

    def __init__(self, splits: RetrievalSplits, settings: TrainSettings,
                 device: torch.device) -> None:
        self.splits, self.settings, self.device = splits, settings, device
        self.loaders = None

    def due(self, epoch: int, dist_info: DistInfo) -> bool:
        every = self.settings.eval_every
        return bool(every) and epoch % every == 0 and dist_info.is_main

    def _build_loaders(self) -> tuple:
        settings = self.settings
        loaders = [make_loader(split, settings.batch_size, settings.workers, self.device)
                   for split in (self.splits.gallery, self.splits.queries)]
        if settings.precise_bn:
            subset = precise_bn_subset(self.splits.gallery, settings.precise_bn, settings.seed)
            loaders.append(make_loader(subset, settings.batch_size, settings.workers,
                                       self.device))
        return tuple(loaders)

    def __call__(self, model: RetrievalNet) -> dict:
        """``monitor_mAP`` and ``monitor_precision_at_<k>`` of ``model`` now, and
        ``monitor_precise_bn`` (whether its BatchNorm statistics were recomputed)."""
        settings = self.settings
        if self.loaders is None:
            self.loaders = self._build_loaders()
        gallery, queries = self.loaders[:2]
        if settings.precise_bn:
            model = copy.deepcopy(model)
            recompute_bn_statistics(model, self.loaders[2], self.device, progress=False)
        result, _, _ = evaluate_model(model, gallery, queries, self.device,
                                      k=settings.monitor_k, progress=settings.progress)
        return {"monitor_mAP": result["mAP"],
                f"monitor_precision_at_{settings.monitor_k}": result["precision_at_k"],
                "monitor_precise_bn": bool(settings.precise_bn)}


def _epoch_line(record: dict, part_names: list[str], settings: TrainSettings) -> str:
    """The log line of one epoch's record."""
    detail = " ".join(f"{_PART_LABELS.get(p, p)} {record[p]:.3f}" for p in part_names)
    line = (f"epoch {record['epoch']}/{settings.epochs}  loss {record['loss']:.4f} ({detail})  "
            f"lr {record['lr']:.4g}  {record['seconds']:.1f}s")
    if record.get("monitor_mAP") is not None:
        k = settings.monitor_k
        line += (f"  [monitor] mAP {100 * record['monitor_mAP']:.2f}%  "
                 f"P@{k} {100 * record[f'monitor_precision_at_{k}']:.2f}%")
    return line


def save_run(run: TrainingRun, config: NetConfig, state: TrainState, settings: TrainSettings,
             classes: list[str], improved: bool) -> None:
    """Checkpoint the epoch: always as the last one, and as the best (the lowest training
    loss, the paper's choice) when it improved."""
    ckpt = checkpoint_state(config, run.model, run.criterion, run.optimizer, run.scheduler,
                            state, settings, classes, run.use_amp)
    if improved:
        save_checkpoint(ckpt, settings.best_path)
    save_checkpoint(ckpt, settings.last_path)


def train(config: NetConfig, settings: TrainSettings, splits: RetrievalSplits,
          device: torch.device, dist_info: DistInfo = DistInfo()) -> TrainState:
    """Train one OPQN model; returns the final bookkeeping state.

    Saves ``settings.last_path`` every epoch and ``settings.best_path`` whenever the mean
    training loss improves (rank 0 only). Raises :class:`TrainingDiverged` on a NaN/inf loss,
    leaving the last good checkpoints in place.
    """
    per_rank_batch = check_per_rank_batch(settings.batch_size, dist_info.world_size)
    run = build_run(config, settings, device)
    state = restore_run(run, settings.last_path, device) if settings.resume else TrainState()
    train_module, sampler = distribute(run, splits.train, settings.seed, device, dist_info)
    monitor = _Monitor(splits, settings, device)
    classes = list(splits.train.classes)
    part_names = logged_parts(run)

    epochs = tqdm(range(state.epoch, settings.epochs), desc="epochs", initial=state.epoch,
                  total=settings.epochs, disable=not (settings.progress and dist_info.is_main))
    for epoch in epochs:
        start = time.perf_counter()
        means, first_step_loss = train_epoch(run, train_module, splits.train, sampler,
                                             epoch, per_rank_batch, settings, device,
                                             dist_info)
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        state.epoch = epoch + 1
        record = {"epoch": state.epoch, "loss": means[0], **dict(zip(part_names, means[1:])),
                  "lr": lr, "seconds": time.perf_counter() - start}
        if epoch == 0 and first_step_loss is not None:
            # The untrained model's loss: a one-epoch run still shows whether it fell.
            record["first_step_loss"] = first_step_loss
        improved = means[0] < state.best_loss
        if improved:
            state.best_loss, state.best_epoch = means[0], state.epoch
        if monitor.due(state.epoch, dist_info):
            try:
                record.update(monitor(run.model))
            except NonFiniteTablesError:
                # A finite but exploding loss can still leave outputs that overflow.
                raise TrainingDiverged(
                    f"the model's outputs became NaN or infinite at epoch {state.epoch} "
                    f"(monitoring evaluation; training loss {means[0]:.4g}); stopped. The "
                    f"last checkpoint is {settings.last_path} (try a lower --lr)"
                ) from None
        state.history.append(record)
        if dist_info.is_main:
            get_logger().info(_epoch_line(record, part_names, settings))
            save_run(run, config, state, settings, classes, improved)
        epochs.set_postfix(loss=f"{means[0]:.4f}")
    epochs.close()
    if dist_info.is_main and settings.precise_bn:
        precise_bn_checkpoints(settings, splits.gallery, device)
    return state


def precise_bn_checkpoints(settings: TrainSettings, images, device: torch.device) -> None:
    """The last step of training: precise BN in both saved models (``best_path`` and
    ``last_path``), their BatchNorm statistics recomputed in float32 over at most
    ``settings.precise_bn`` of ``images`` (the training identities under the evaluation
    transform), saved back in place; each checkpoint records it under ``"precise_bn"``.
    A model saved twice (best and last at the same epoch) is recomputed once."""
    subset = precise_bn_subset(images, settings.precise_bn, settings.seed)
    loader = make_loader(subset, settings.batch_size, settings.workers, device)
    done: dict[int, tuple[dict, dict]] = {}  # epoch -> (backbone state, record)
    for path in dict.fromkeys((settings.best_path, settings.last_path)):
        if not Path(path).is_file():
            continue
        checkpoint = load_checkpoint(path, map_location=device)
        epoch = int(checkpoint["epoch"])
        if epoch not in done:
            model = load_model(checkpoint, device)
            record = {**recompute_bn_statistics(model, loader, device,
                                                progress=settings.progress),
                      "transform": "evaluation", "precision": "float32"}
            done[epoch] = ({k: v.cpu() for k, v in model.backbone.state_dict().items()},
                           record)
        checkpoint["backbone"], checkpoint["precise_bn"] = done[epoch]
        save_checkpoint(checkpoint, path)
        get_logger().info("precise BN: %d BatchNorm layers recomputed over %d training images "
                          "(evaluation transform, float32) in %s",
                          checkpoint["precise_bn"]["layers"], checkpoint["precise_bn"]["images"],
                          path)

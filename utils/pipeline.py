"""What ``opqn_main.py`` runs: training jobs and evaluation jobs, wired from the pieces."""
from __future__ import annotations

import argparse
import os
import platform
from datetime import datetime
from pathlib import Path

import torch

from data.datasets import dataset_preset, split_dirs
from data.loaders import RetrievalSplits, build_splits, make_loader
from models import OPQN, OPQNConfig, choose_feature_dim

from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from .evaluation import evaluate_model
from .logger import get_logger, setup_logging
from .precision import resolve_amp
from .reporting import plot_pr_curves, summary_line, write_result
from .runtime import DistInfo, cleanup_distributed, init_distributed
from .training import TrainSettings, check_per_rank_batch, load_model, train
from .validation import CodeSpec, UsageError, check_feature_dim, check_split_dir

REQUIRED_KEYS = ("config", "backbone", "quantizer")
RESUME_KEYS = REQUIRED_KEYS + ("class_weights", "epoch", "best_loss", "best_epoch", "history",
                               "optimizer", "scheduler", "rng")


def loader_workers(args: argparse.Namespace) -> int:
    """--workers, or by default min(4, CPU count)."""
    return args.workers if args.workers is not None else min(4, os.cpu_count() or 1)


def _prepare_folders(args: argparse.Namespace, cross_train: bool) -> tuple[Path, Path]:
    """Generate synthface if needed, then check that the split folders exist."""
    uses_synthface = args.dataset == "synthface"
    if uses_synthface:
        from data.synthface import ensure_synthface

        options = {}
        if args.synthface_identities is not None:
            options["num_identities"] = args.synthface_identities
            options["cross_identities"] = max(2, args.synthface_identities // 2)
        if args.synthface_images is not None:
            options["train_per_identity"] = args.synthface_images
        ensure_synthface(args.data_dir, progress=not args.no_progress, **options)
    train_dir, test_dir = split_dirs(args.data_dir, args.dataset, cross_train)
    check_split_dir(train_dir, "training" if not cross_train else "cross-training")
    check_split_dir(test_dir, "test")
    return train_dir, test_dir


def _use_cache(args: argparse.Namespace, preset) -> bool:
    return preset.cache if args.cache is None else args.cache


def _result_metadata(config: OPQNConfig, args: argparse.Namespace, device: torch.device) -> dict:
    return {
        "dataset": args.dataset,
        "cross_dataset": bool(args.cross_dataset),
        "train_dataset": config.dataset,
        "bits": config.bits,
        "num_books": config.num_books,
        "num_words": config.num_words,
        "feature_dim": config.feature_dim,
        "input_size": config.input_size,
        "width": config.width,
        "device": str(device),
        "torch": torch.__version__,
        "host": platform.node(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def _evaluate_and_report(model, config: OPQNConfig, splits: RetrievalSplits,
                         args: argparse.Namespace, device: torch.device, k: int, stem: str,
                         extra: dict) -> tuple[dict, tuple]:
    workers = loader_workers(args)
    batch = args.bs or 256  # inference only: the batch size does not change the codes
    gallery = make_loader(splits.gallery, batch, workers, device)
    queries = make_loader(splits.queries, batch, workers, device)
    # Encoding stays fp32: bf16 features changed 2.2% of a trained model's gallery codes
    # (bench/bench_amp_codes.py), above the 1% the project accepts.
    result, codes, labels = evaluate_model(model, gallery, queries, device, k=k, ties=args.ties,
                                           progress=not args.no_progress, amp=False)
    result = {**_result_metadata(config, args, device), **extra, **result}
    json_path, png_path = write_result(result, args.out, stem)
    log = get_logger()
    log.info(summary_line({**result, "name": stem}))
    log.info("results: %s, %s", json_path, png_path)
    return result, (codes, labels)


def run_training(args: argparse.Namespace, specs: list[CodeSpec], device: torch.device) -> None:
    """Train one model per spec, each followed by a full evaluation of its saved model."""
    preset = dataset_preset(args.dataset, cross=args.cross_dataset)
    width = args.width or preset.width
    epochs = args.epochs or preset.epochs
    source = args.dataset if not args.cross_dataset else (
        "synthface" if args.dataset == "synthface" else "vggface2")
    check_per_rank_batch(args.bs or preset.batch_size, int(os.environ.get("WORLD_SIZE", "1")))
    jobs = []
    for spec in specs:  # validate every model before any work
        feature_dim = args.feature_dim or choose_feature_dim(
            spec.num_books, spec.num_words, preset.input_size)
        check_feature_dim(feature_dim, spec.num_books, spec.num_words)
        prefix = f"cross_{source}" if args.cross_dataset else source
        name = spec.name or f"{prefix}_{spec.bits}bits.tar"
        # A bare name goes to --checkpoint-dir, as the original's ./checkpoint/NAME.
        best = Path(name) if Path(name).parent.parts else Path(args.checkpoint_dir) / name
        last = best.with_name(f"{best.stem}.last{best.suffix or '.tar'}")
        if args.resume and not last.is_file():
            raise UsageError(f"--resume: no last checkpoint to resume from: {last}")
        if args.resume:
            _check_resumable(spec, {"feature_dim": feature_dim, "width": width,
                                    "input_size": preset.input_size}, last)
        jobs.append((spec, feature_dim, best, last))

    dist_info = init_distributed(args.device)
    try:
        # Rank 0 generates data and builds caches first; the others then only read them.
        if dist_info.distributed and not dist_info.is_main:
            torch.distributed.barrier()
        train_dir, test_dir = _prepare_folders(args, cross_train=args.cross_dataset)
        splits = build_splits(train_dir, test_dir, preset.input_size,
                              cache=_use_cache(args, preset),
                              progress=not args.no_progress and dist_info.is_main)
        if dist_info.distributed and dist_info.is_main:
            torch.distributed.barrier()
        for spec, feature_dim, best, last in jobs:
            _train_one(args, spec, feature_dim, best, last, splits, preset, width, epochs,
                       source, device, dist_info)
    finally:
        cleanup_distributed()


def _train_one(args, spec: CodeSpec, feature_dim: int, best: Path, last: Path,
               splits: RetrievalSplits, preset, width: int, epochs: int, source: str,
               device: torch.device, dist_info: DistInfo) -> None:
    stamp = datetime.now().strftime("%m%d%H%M%S")
    settings_batch = args.bs or preset.batch_size
    log = setup_logging(Path(args.log_dir) / f"{best.stem}_{stamp}.txt", dist_info.is_main)
    config = OPQNConfig(
        num_books=spec.num_books, num_words=spec.num_words, feature_dim=feature_dim,
        num_classes=splits.num_classes, input_size=preset.input_size, width=width,
        margin=args.margin, scale=args.scale or preset.scale, miu=args.miu, dataset=source)
    settings = TrainSettings(
        epochs=epochs, lr=args.lr, lr_step=preset.lr_step, batch_size=settings_batch,
        workers=loader_workers(args),
        seed=args.seed, eval_every=args.eval_every, best_path=best, last_path=last,
        resume=args.resume, progress=not args.no_progress, amp=args.amp)
    log.info("[config] dataset %s%s: %d identities, %d training images, %d test images",
             source, " (cross-dataset training)" if args.cross_dataset else "",
             splits.num_classes, len(splits.train), len(splits.queries))
    log.info("[config] %d-bit code: %d codebooks x %d words, D=%d (d=%d), input %dx%d, "
             "width %d, margin %.3f, scale %.1f, miu %.4f, bf16 autocast %s", config.bits, config.num_books,
             config.num_words, config.feature_dim, config.word_dim, config.input_size,
             config.input_size, config.width, config.margin, config.scale, config.miu,
             "on" if resolve_amp(args.amp, device) else "off")
    log.info("[config] %d epochs, lr %.4g halved every %d, batch %d, seed %d, device %s%s",
             epochs, args.lr, preset.lr_step, settings_batch, args.seed, device,
             f", {dist_info.world_size} processes" if dist_info.distributed else "")
    state = train(config, settings, splits, device, dist_info)
    if not dist_info.is_main:
        return
    log.info("training done: lowest loss %.4f at epoch %d, saved as %s (last epoch: %s)",
             state.best_loss, state.best_epoch, best, last)
    checkpoint = load_checkpoint(best, map_location=device, required_keys=REQUIRED_KEYS)
    model = load_model(checkpoint, device)
    extra = {"checkpoint": str(best), "checkpoint_epoch": int(checkpoint["epoch"]),
             "ties": args.ties}
    _evaluate_and_report(model, config, splits, args, device, args.topk or preset.top_k,
                         best.stem, extra)


def _reconcile(spec: CodeSpec, config: dict, path: Path) -> None:
    """--len/--num/--words may be omitted with -e, but must not contradict the checkpoint."""
    stored = {"--len": config.get("bits"), "--num": config.get("num_books"),
              "--words": config.get("num_words")}
    given = {"--len": spec.bits, "--num": spec.num_books, "--words": spec.num_words}
    for flag, value in given.items():
        if value is not None and value != stored[flag]:
            raise UsageError(f"{flag} {value} contradicts checkpoint {path}, which holds "
                             f"{flag} {stored[flag]} ({stored['--len']}-bit, "
                             f"{stored['--num']}x{stored['--words']})")


def _checked_config(checkpoint: dict, path: Path) -> dict:
    config = checkpoint["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path} has no valid config (it holds a "
                              f"{type(config).__name__})", path)
    return config


def _checked_model(checkpoint: dict, path: Path) -> OPQN:
    """The checkpoint's model, built on the CPU: its config and weights must agree."""
    try:
        return load_model(checkpoint, torch.device("cpu"))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}", path) from None
    except Exception as exc:  # a config with missing or nonsensical values
        raise CheckpointError(f"checkpoint {path} holds an invalid model configuration "
                              f"({type(exc).__name__}: {exc})", path) from None


def _check_resumable(spec: CodeSpec, expected: dict, path: Path) -> None:
    """--resume must continue the same model: its last checkpoint is complete and agrees."""
    checkpoint = load_checkpoint(path, map_location="cpu", required_keys=RESUME_KEYS)
    config = _checked_config(checkpoint, path)
    _reconcile(spec, config, path)
    for key, value in expected.items():
        if config.get(key) != value:
            raise UsageError(f"--resume: {key} {value} of this run contradicts checkpoint "
                             f"{path}, which holds {key} {config.get(key)}")
    _checked_model(checkpoint, path)


def run_evaluation(args: argparse.Namespace, specs: list[CodeSpec], device: torch.device) -> None:
    """Evaluate each checkpoint of --load on --dataset (gallery = train, queries = test)."""
    log = setup_logging(None)
    loaded = []
    for spec in specs:  # every checkpoint is checked before any work
        path = checkpoint_path(spec.name, args.checkpoint_dir)
        checkpoint = load_checkpoint(path, map_location="cpu", required_keys=REQUIRED_KEYS)
        _reconcile(spec, _checked_config(checkpoint, path), path)
        # Built on the CPU now, so that weights that do not fit fail before any work.
        loaded.append((path, checkpoint, _checked_model(checkpoint, path)))
    preset = dataset_preset(args.dataset)
    k = args.topk or preset.top_k
    train_dir, test_dir = _prepare_folders(args, cross_train=False)
    splits_by_size: dict[int, RetrievalSplits] = {}
    curves = []
    for index, (path, checkpoint, model) in enumerate(loaded):
        config = OPQNConfig.from_dict(checkpoint["config"])
        if args.cross_dataset and config.input_size != 112:
            log.warning("warning: -c expects a 112x112 cross-dataset model; %s was trained at "
                        "%dx%d", path, config.input_size, config.input_size)
        if config.input_size not in splits_by_size:
            splits_by_size[config.input_size] = build_splits(
                train_dir, test_dir, config.input_size, with_train=False,
                cache=_use_cache(args, preset), progress=not args.no_progress)
        splits = splits_by_size[config.input_size]
        trained_on = set(checkpoint.get("classes", []))
        overlap = len(trained_on & set(splits.gallery.classes))
        if args.cross_dataset and overlap:
            log.warning("warning: %d gallery identities were also training identities of %s; "
                        "the cross-dataset protocol needs disjoint identities", overlap, path)
        model = model.to(device)
        log.info("evaluating %s (%d-bit, %dx%d) on %s", path, config.bits, config.num_books,
                 config.num_words, args.dataset)
        stem = path.stem if (path.stem.startswith(args.dataset) and not args.cross_dataset) \
            else f"{path.stem}_on_{args.dataset}{'_cross' if args.cross_dataset else ''}"
        extra = {"checkpoint": str(path), "checkpoint_epoch": int(checkpoint.get("epoch", 0)),
                 "ties": args.ties, "identity_overlap": overlap}
        result, (codes, _labels) = _evaluate_and_report(model, config, splits, args, device, k,
                                                        stem, extra)
        curves.append((f"{config.bits}-bit ({config.num_books}x{config.num_words})",
                       result["pr_curve"]))
        if args.export_faiss:
            from .faiss_index import build_faiss_index, save_faiss_index

            index_path = Path(args.export_faiss[index])
            save_faiss_index(build_faiss_index(model.quantizer.codebooks.cpu(), codes.cpu()),
                             index_path)
            log.info("faiss IndexPQ with %d gallery codes written to %s", codes.shape[0],
                     index_path)
    if len(curves) > 1:
        name = f"{args.dataset}{'_cross' if args.cross_dataset else ''}_pr_curves.png"
        path = plot_pr_curves(curves, Path(args.out) / name,
                              title=f"{args.dataset}: precision-recall")
        log.info("PR curves of all models: %s", path)

"""What ``opqn_main.py`` runs: training jobs and evaluation jobs, wired from the pieces."""
from __future__ import annotations

import argparse
import csv
import os
import platform
from datetime import datetime
from pathlib import Path

import torch

from data.datasets import dataset_preset, split_dirs
from data.folders import identity_folders
from data.loaders import RetrievalSplits, build_splits, make_loader
from models import (DEFAULT_BACKBONE, OPQN, BackboneError, OPQNConfig, PretrainedUnavailable,
                    build_backbone, choose_feature_dim, parse_backbone_args)

from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from .evaluation import evaluate_model
from .logger import get_logger, setup_logging
from .methods import default_lr, default_optimizer
from .precision import resolve_amp
from .reporting import curve_label, plot_pr_curves, summary_line, write_result
from .runtime import DistInfo, cleanup_distributed, init_distributed, memory_budget
from .schedules import describe_schedule
from .training import (CRITERION_KEY, TrainingInterrupted, TrainSettings, check_per_rank_batch,
                       criterion_state, load_model, train)
from .validation import (HASHING_METHODS, CodeSpec, UsageError, check_batch_fits,
                         check_feature_dim, check_identity_overlap, check_no_overwrite,
                         check_quantizer_memory, check_split_dir)

REQUIRED_KEYS = ("config", "backbone", "quantizer")
RESUME_KEYS = REQUIRED_KEYS + ("epoch", "best_loss", "best_epoch", "history",
                               "optimizer", "scheduler", "rng")


def loader_workers(args: argparse.Namespace) -> int:
    """--workers, or by default min(4, CPU count)."""
    return args.workers if args.workers is not None else min(4, os.cpu_count() or 1)


def _prepare_folders(args: argparse.Namespace, cross_train: bool) -> tuple[Path, Path]:
    """Generate synthface if needed, then check that the split folders exist."""
    uses_synthface = args.dataset == "synthface"
    if uses_synthface:
        from data.synthface import SynthfaceMismatch, use_synthface

        # Generated only when absent or asked for: never silently over the data a model
        # was trained on (-e refuses --regenerate-synthface in check_options).
        try:
            _root, what = use_synthface(
                args.data_dir, args.synthface_identities, args.synthface_images,
                regenerate=getattr(args, "regenerate_synthface", False),
                progress=not args.no_progress)
        except SynthfaceMismatch as exc:
            raise UsageError(str(exc)) from None
        get_logger().info(what)
    train_dir, test_dir = split_dirs(args.data_dir, args.dataset, cross_train)
    check_split_dir(train_dir, "training" if not cross_train else "cross-training")
    check_split_dir(test_dir, "test")
    return train_dir, test_dir


def _use_cache(args: argparse.Namespace, preset) -> bool:
    return preset.cache if args.cache is None else args.cache


def _result_metadata(config: OPQNConfig, args: argparse.Namespace, device: torch.device) -> dict:
    return {
        "method": config.method,
        "dataset": args.dataset,
        "cross_dataset": bool(args.cross_dataset),
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


def _evaluate_and_report(model, config: OPQNConfig, splits: RetrievalSplits,
                         args: argparse.Namespace, device: torch.device, k: int, stem: str,
                         extra: dict, title: str | None = None) -> tuple[dict, tuple]:
    workers = loader_workers(args)
    batch = args.bs or 256  # inference only: the batch size does not change the codes
    gallery = make_loader(splits.gallery, batch, workers, device)
    queries = make_loader(splits.queries, batch, workers, device)
    # Encoding stays fp32: bf16 features changed 2.2% of a trained model's gallery codes
    # (bench/bench_amp_codes.py), above the 1% the project accepts.
    result, codes, labels = evaluate_model(model, gallery, queries, device, k=k, ties=args.ties,
                                           progress=not args.no_progress, amp=False)
    result = {**_result_metadata(config, args, device), **extra, **result}
    json_path, png_path = write_result(result, args.out, stem, title=title)
    log = get_logger()
    log.info(summary_line({**result, "name": stem}))
    log.info("results: %s, %s", json_path, png_path)
    return result, (codes, labels)


def _backbone_choice(args: argparse.Namespace, input_size: int, width: int) -> tuple[str, dict]:
    """--backbone and --backbone-args, checked by building the backbone once before any work
    (this also fetches --pretrained weights, or fails in one line when they are out of reach).
    """
    name = args.backbone or DEFAULT_BACKBONE
    try:
        backbone_args = parse_backbone_args(args.backbone_args)
        if name != DEFAULT_BACKBONE and args.width is not None:
            raise UsageError(f"--width sets sphere20's channels; backbone {name!r} has its own")
        if name != DEFAULT_BACKBONE or args.pretrained or backbone_args:
            # A resumed run loads its own weights: nothing to download.
            build_backbone(name, input_size, width, 2,
                           pretrained=args.pretrained and not args.resume,
                           backbone_args=backbone_args)
    except PretrainedUnavailable:
        raise
    except BackboneError as exc:
        raise UsageError(f"--backbone {name}: {exc}") from None
    return name, backbone_args


def _schedule_choice(args: argparse.Namespace, epochs: int) -> tuple[str, int]:
    schedule, warmup = args.schedule or "step", args.warmup or 0
    if warmup and schedule != "cosine":
        raise UsageError("--warmup works with --schedule cosine")
    if warmup >= epochs:
        raise UsageError(f"--warmup {warmup} must be smaller than the {epochs} epochs")
    return schedule, warmup


def run_training(args: argparse.Namespace, specs: list[CodeSpec], device: torch.device) -> None:
    """Train one model per spec, each followed by a full evaluation of its saved model."""
    preset = dataset_preset(args.dataset, cross=args.cross_dataset)
    method = args.method or "opqn"
    width = args.width or preset.width
    epochs = args.epochs or preset.epochs
    schedule, warmup = _schedule_choice(args, epochs)
    margin_type = args.margin_type or "cosface"
    backbone, backbone_args = _backbone_choice(args, preset.input_size, width)
    source = args.dataset if not args.cross_dataset else (
        "synthface" if args.dataset == "synthface" else "vggface2")
    check_per_rank_batch(args.bs or preset.batch_size, int(os.environ.get("WORLD_SIZE", "1")))
    jobs = []
    budget, budget_source = memory_budget(device)
    for spec in specs:  # validate every model before any work
        if method in HASHING_METHODS:  # the feature is the L-bit hash layer itself
            feature_dim = spec.bits
        else:
            feature_dim = args.feature_dim or choose_feature_dim(
                spec.num_books, spec.num_words, preset.input_size)
        check_feature_dim(feature_dim, spec.num_books, spec.num_words, method)
        check_quantizer_memory(
            spec, feature_dim, budget, budget_source,
            lambda m, k: args.feature_dim or choose_feature_dim(m, k, preset.input_size))
        prefix = f"cross_{source}" if args.cross_dataset else source
        name = spec.name or f"{prefix}_{spec.bits}bits.tar"
        # A bare name goes to --checkpoint-dir, as the original's ./checkpoint/NAME.
        best = Path(name) if Path(name).parent.parts else Path(args.checkpoint_dir) / name
        last = best.with_name(f"{best.stem}.last{best.suffix or '.tar'}")
        if any(best == job[2] for job in jobs):
            raise UsageError(f"two models of this run would both be saved as {best}: give "
                             f"each one its own --save name")
        check_no_overwrite(best, last, args.resume and last.is_file(),
                           getattr(args, "overwrite", False))
        jobs.append((spec, feature_dim, best, last))
    resuming = [job for job in jobs if job[3].is_file()] if args.resume else []
    if args.resume and not resuming:
        raise UsageError(f"--resume: no last checkpoint to resume from: {jobs[0][3]}")
    for spec, feature_dim, _best, last in resuming:
        _check_resumable(spec, {"feature_dim": feature_dim, "width": width,
                                "input_size": preset.input_size, "method": method,
                                "backbone": backbone, "backbone_args": backbone_args,
                                "margin_type": margin_type}, last,
                         {"schedule": schedule, "warmup": warmup, "epochs": epochs})

    dist_info = init_distributed(args.device)
    try:
        # Rank 0 generates data and builds caches first; the others then only read them.
        setup_logging(None, dist_info.is_main)
        if dist_info.distributed and not dist_info.is_main:
            torch.distributed.barrier()
        train_dir, test_dir = _prepare_folders(args, cross_train=args.cross_dataset)
        splits = build_splits(train_dir, test_dir, preset.input_size,
                              cache=_use_cache(args, preset),
                              progress=not args.no_progress and dist_info.is_main)
        if dist_info.distributed and dist_info.is_main:
            torch.distributed.barrier()
        check_batch_fits(len(splits.train), args.bs, preset.batch_size, train_dir)
        model_choice = {"backbone": backbone, "backbone_args": backbone_args,
                        "pretrained": bool(args.pretrained), "margin_type": margin_type}
        try:
            for spec, feature_dim, best, last in jobs:
                # Under --resume a model of a multi-model run that never started starts now.
                _train_one(args, spec, feature_dim, best, last, splits, preset, width, epochs,
                           source, device, dist_info, model_choice, (schedule, warmup),
                           resume=args.resume and last.is_file())
        except KeyboardInterrupt:
            raise TrainingInterrupted(any(job[3].is_file() for job in jobs)) from None
    finally:
        cleanup_distributed()


def _train_one(args, spec: CodeSpec, feature_dim: int, best: Path, last: Path,
               splits: RetrievalSplits, preset, width: int, epochs: int, source: str,
               device: torch.device, dist_info: DistInfo, model_choice: dict,
               schedule: tuple[str, int] = ("step", 0), resume: bool | None = None) -> None:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    settings_batch = args.bs or preset.batch_size
    log = setup_logging(Path(args.log_dir) / f"{best.stem}_{stamp}.txt", dist_info.is_main)
    config = OPQNConfig(
        num_books=spec.num_books, num_words=spec.num_words, feature_dim=feature_dim,
        num_classes=splits.num_classes, input_size=preset.input_size, width=width,
        margin=args.margin, scale=args.scale or preset.scale, miu=args.miu, dataset=source,
        **model_choice, **_method_fields(args))
    optimizer = args.optimizer or default_optimizer(config.method, preset.input_size)
    lr = args.lr or default_lr(config.method, optimizer)
    settings = TrainSettings(
        epochs=epochs, lr=lr, optimizer=optimizer, lr_step=preset.lr_step,
        batch_size=settings_batch,
        workers=loader_workers(args),
        seed=args.seed, eval_every=args.eval_every, best_path=best, last_path=last,
        resume=args.resume if resume is None else resume, progress=not args.no_progress,
        schedule=schedule[0], warmup=schedule[1], amp=args.amp)
    log.info("[config] dataset %s%s: %d identities, %d training images, %d test images",
             source, " (cross-dataset training)" if args.cross_dataset else "",
             splits.num_classes, len(splits.train), len(splits.queries))
    log.info("[config] method %s%s", config.method, _method_detail(config))
    log.info("[config] %d-bit code: %d codebooks x %d words, D=%d (d=%d), input %dx%d, "
             "width %d, margin %.3f, scale %.1f, miu %.4f, bf16 autocast %s", config.bits,
             config.num_books, config.num_words, config.feature_dim, config.word_dim, config.input_size,
             config.input_size, config.width, config.margin, config.scale, config.miu,
             "on" if resolve_amp(args.amp, device) else "off")
    log.info("[config] backbone %s%s%s, %s margin", config.backbone,
             f" {config.backbone_args}" if config.backbone_args else "",
             " (timm pretrained)" if config.pretrained else "", config.margin_type)
    log.info("[config] %d epochs, %s, %s, batch %d, seed %d, device %s%s",
             epochs, optimizer, describe_schedule(schedule[0], lr, preset.lr_step, schedule[1]),
             settings_batch, args.seed, device,
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
    split = " (cross_train/cross_test)" if args.cross_dataset else ""
    _evaluate_and_report(model, config, splits, args, device, args.topk or preset.top_k,
                         best.stem, extra, title=f"{best.stem} on {source}{split}: "
                                                 f"precision-recall")


_METHOD_FIELDS = {"dpq": ("dpq_alpha",),
                  "gpq": ("gpq_alpha", "gpq_beta", "gpq_lambda_ce", "gpq_lambda_entropy"),
                  "dcdh": ("dcdh_sigma", "dcdh_eta", "dcdh_center_weight")}


def _method_fields(args: argparse.Namespace) -> dict:
    """The config fields of --method and its hyper-parameter flags."""
    method = args.method or "opqn"
    fields = {"method": method}
    for name in _METHOD_FIELDS.get(method, ()):
        fields[name] = getattr(args, name)
    return fields


def _method_detail(config: OPQNConfig) -> str:
    names = _METHOD_FIELDS.get(config.method, ())
    return (" (" + ", ".join(f"{n} {getattr(config, n):g}" for n in names) + ")") if names \
        else ""


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


def _check_resumable(spec: CodeSpec, expected: dict, path: Path,
                     expected_schedule: dict | None = None) -> None:
    """--resume must continue the same model: its last checkpoint is complete and agrees."""
    checkpoint = load_checkpoint(path, map_location="cpu", required_keys=REQUIRED_KEYS)
    # A converted authors' file has no training state: resuming it starts a new class head.
    converted = "converted_from" in checkpoint
    needed = REQUIRED_KEYS + ("epoch",) if converted else RESUME_KEYS
    missing = [key for key in needed if key not in checkpoint]
    if not converted and criterion_state(checkpoint) is None:
        missing.append(CRITERION_KEY)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks required keys: {', '.join(missing)}",
                              path)
    config = _checked_config(checkpoint, path)
    _reconcile(spec, config, path)
    # Fields absent from older checkpoints take their defaults (opqn, sphere20, cosface).
    defaults = OPQNConfig(1, 2, 2, 1).to_dict()
    for key, value in expected.items():
        stored = config.get(key, defaults.get(key))
        if stored != value:
            raise UsageError(f"--resume: {key} {value} of this run contradicts checkpoint "
                             f"{path}, which holds {key} {stored}")
    stored_settings = checkpoint.get("train_settings") or {}
    if expected_schedule:
        schedule = stored_settings.get("schedule", "step")
        keys = ("schedule", "warmup") + (("epochs",) if schedule == "cosine" else ())
        for key in keys:
            value = expected_schedule[key]
            stored = stored_settings.get(key, {"schedule": "step", "warmup": 0}.get(key))
            if stored != value:
                raise UsageError(f"--resume: {key} {value} of this run contradicts checkpoint "
                                 f"{path}, which holds {key} {stored} (a {schedule} schedule "
                                 f"resumes only with its own settings)")
    _checked_model(checkpoint, path)


def run_evaluation(args: argparse.Namespace, specs: list[CodeSpec], device: torch.device) -> None:
    """Evaluate each checkpoint of --load on --dataset (gallery = train, queries = test)."""
    log = setup_logging(None)
    loaded = []
    for spec in specs:  # every checkpoint is checked before any work
        path = checkpoint_path(spec.name, args.checkpoint_dir)
        checkpoint = load_checkpoint(path, map_location="cpu", required_keys=REQUIRED_KEYS)
        config = _checked_config(checkpoint, path)
        _reconcile(spec, config, path)
        stored_backbone = config.get("backbone", DEFAULT_BACKBONE)
        if args.backbone and args.backbone != stored_backbone:
            raise UsageError(f"--backbone {args.backbone} contradicts checkpoint {path}, which "
                             f"holds backbone {stored_backbone}")
        stored_method = config.get("method", "opqn")
        if args.method and args.method != stored_method:
            raise UsageError(f"--method {args.method} contradicts checkpoint {path}, which holds "
                             f"a {stored_method} model (-e reads the method from the checkpoint)")
        # Built on the CPU now, so that weights that do not fit fail before any work.
        model = _checked_model(checkpoint, path)
        if args.export_faiss and model.quantizer.faiss_metric is None:
            raise UsageError(f"--export-faiss: faiss cannot express the {stored_method} score "
                             f"of {path}")
        loaded.append((path, checkpoint, model))
    preset = dataset_preset(args.dataset)
    k = args.topk or preset.top_k
    train_dir, test_dir = _prepare_folders(args, cross_train=False)
    evaluated = set(identity_folders(train_dir)) | set(identity_folders(test_dir))
    overlaps = []
    for path, checkpoint, _model in loaded:  # the protocol is checked before any work
        trained_on = checkpoint.get("classes", [])
        overlaps.append(check_identity_overlap(
            trained_on, evaluated, path, allow=not args.cross_dataset
            or args.allow_identity_overlap))
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
        overlap = len(overlaps[index])
        if args.cross_dataset and overlap:
            log.warning("warning: %d evaluated identities were also training identities of "
                        "%s (--allow-identity-overlap)", overlap, path)
        model = model.to(device)
        log.info("evaluating %s (%s, %d-bit, %dx%d) on %s", path, config.method, config.bits,
                 config.num_books, config.num_words, args.dataset)
        # Its own name, never the training-time result's <stem>.json (see README).
        stem = f"{path.stem}_on_{args.dataset}{'_cross' if args.cross_dataset else ''}"
        extra = {"checkpoint": str(path), "checkpoint_epoch": int(checkpoint.get("epoch", 0)),
                 "ties": args.ties, "identity_overlap": overlap}
        title = (f"cross-dataset: {path.stem} on {args.dataset} (unseen identities)"
                 if args.cross_dataset else f"{path.stem} on {args.dataset}: precision-recall")
        result, (codes, _labels) = _evaluate_and_report(model, config, splits, args, device, k,
                                                        stem, extra, title=title)
        from .search import write_examples

        examples = write_examples(model, splits.gallery, splits.queries, codes, args, device,
                                  stem)
        if examples is not None:
            log.info("retrieval examples: %s", examples)
        curves.append((curve_label({**checkpoint["config"], **result}, path.stem),
                       result["pr_curve"]))
        if args.export_faiss:
            _export_faiss(model, codes, splits.gallery,
                          export_path(args.export_faiss[index], args.out))
    if len(curves) > 1:
        name = f"{args.dataset}{'_cross' if args.cross_dataset else ''}_pr_curves.png"
        title = (f"cross-dataset on {args.dataset} (unseen identities): {len(curves)} models"
                 if args.cross_dataset else f"{args.dataset}: precision-recall of "
                                            f"{len(curves)} models")
        path = plot_pr_curves(curves, Path(args.out) / name, title=title)
        log.info("PR curves of all models: %s", path)


def export_path(value: str, out_dir: str) -> Path:
    """--export-faiss: a bare file name goes under --out; a path is taken as given."""
    path = Path(value)
    return path if path.parent.parts else Path(out_dir) / path


def gallery_paths(gallery) -> list[tuple[str, str]]:
    """``(image file, identity)`` of each gallery row, in encoding order (unreadable files
    left out, as the encoder leaves them out)."""
    names = {index: name for name, index in gallery.class_to_idx.items()}
    cache = getattr(gallery, "cache", None)
    if cache is not None:  # CachedImageDataset: failed files were never in the cache
        return [(path, names[int(label)]) for path, label in zip(cache.paths, gallery.targets)]
    broken = getattr(gallery, "broken", set())
    return [(path, names[label]) for path, label in gallery.samples if path not in broken]


def _export_faiss(model: OPQN, codes: torch.Tensor, gallery, index_path: Path) -> None:
    """The faiss index of the gallery codes for the method's score (faiss_index.
    build_head_index), and ``<stem>.ids.csv`` beside it: the image of each faiss id, without
    which the ids mean nothing."""
    from .faiss_index import build_head_index, save_faiss_index

    paths = gallery_paths(gallery)
    if len(paths) != codes.shape[0]:
        raise RuntimeError(f"{codes.shape[0]} gallery codes but {len(paths)} gallery files: "
                           f"cannot write the id list of {index_path}")
    index_path.parent.mkdir(parents=True, exist_ok=True)
    faiss_index = build_head_index(model.quantizer, codes.cpu())
    save_faiss_index(faiss_index, index_path)
    ids_path = index_path.with_name(f"{index_path.stem}.ids.csv")
    with open(ids_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "identity"])
        for i, (file, identity) in enumerate(paths):
            writer.writerow([i, file, identity])
    get_logger().info("faiss %s with %d gallery codes written to %s (ids: %s)",
                      type(faiss_index).__name__, codes.shape[0], index_path, ids_path)

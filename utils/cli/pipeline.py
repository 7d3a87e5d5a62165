"""What ``opqn_main.py`` runs: training jobs and evaluation jobs, wired from the pieces.

Both flows take a :class:`utils.cli.settings.RunSettings` and hand each helper the group it
reads.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from data.datasets import dataset_preset, readable_items
from data.folders import identity_folders
from data.loaders import RetrievalSplits, build_splits, make_loader
from models import (DEFAULT_BACKBONE, OPQN, BackboneError, OPQNConfig, PretrainedUnavailable,
                    build_backbone, choose_feature_dim, get_method, parse_backbone_args)
from utils.checkpoints import (checkpoint_path, last_checkpoint_path, load_checkpoint,
                               load_model)
from utils.logger import get_logger, setup_logging
from utils.precision import resolve_amp
from utils.retrieval.encoding import evaluate_model
from utils.retrieval.export import export_gallery_index, export_path
from utils.runtime import DistInfo, cleanup_distributed, init_distributed, memory_budget
from utils.training.loop import TrainingInterrupted, TrainSettings, check_per_rank_batch, train
from utils.training.schedules import describe_schedule

from .checkpoint_checks import (REQUIRED_KEYS, check_evaluation_choice, check_resumable,
                                checked_config, checked_model, reconcile_spec)
from .data_folders import prepare_folders
from .reporting import (curve_label, result_metadata, summary_line, training_provenance,
                        write_pr_comparison, write_result)
from .search import write_examples
from .settings import ModelSettings, RunSettings, TrainingOptions
from .validation import (CodeSpec, UsageError, check_batch_fits,
                         check_feature_dim, check_identity_overlap, check_no_overwrite,
                         check_quantizer_memory)


def _evaluate_and_report(model, config: OPQNConfig, splits: RetrievalSplits, run: RunSettings,
                         device: torch.device, k: int, stem: str, extra: dict,
                         title: str | None = None) -> tuple[dict, tuple]:
    """Encode the gallery, rank it for every query, and write ``<stem>.json`` and its PR
    curve under --out; returns the result and the gallery's (codes, labels)."""
    workers, batch = run.data.loader_workers(), run.evaluation.inference_batch
    gallery = make_loader(splits.gallery, batch, workers, device)
    queries = make_loader(splits.queries, batch, workers, device)
    # Encoding stays fp32: bf16 features changed 2.2% of a trained model's gallery codes
    # (bench/bench_amp_codes.py), above the 1% the project accepts.
    result, codes, labels = evaluate_model(model, gallery, queries, device, k=k,
                                           ties=run.evaluation.ties,
                                           progress=run.output.progress, amp=False)
    result = {**result_metadata(config, run.data, device), **extra, **result}
    json_path, png_path = write_result(result, run.output.out, stem, title=title)
    log = get_logger()
    log.info(summary_line({**result, "name": stem}))
    log.info("results: %s, %s", json_path, png_path)
    return result, (codes, labels)


def _backbone_choice(model: ModelSettings, resume: bool, input_size: int,
                     width: int) -> tuple[str, dict]:
    """--backbone and --backbone-args, checked by building the backbone once before any work
    (this also fetches --pretrained weights, or fails in one line when they are out of reach).
    """
    name = model.backbone or DEFAULT_BACKBONE
    try:
        backbone_args = parse_backbone_args(list(model.backbone_args) or None)
        if name != DEFAULT_BACKBONE and model.width is not None:
            raise UsageError(f"--width sets sphere20's channels; backbone {name!r} has its own")
        if name != DEFAULT_BACKBONE or model.pretrained or backbone_args:
            # A resumed run loads its own weights: nothing to download.
            build_backbone(name, input_size, width, 2,
                           pretrained=model.pretrained and not resume,
                           backbone_args=backbone_args)
    except PretrainedUnavailable:
        raise
    except BackboneError as exc:
        raise UsageError(f"--backbone {name}: {exc}") from None
    return name, backbone_args


def _schedule_choice(training: TrainingOptions, epochs: int) -> tuple[str, int]:
    schedule, warmup = training.schedule or "step", training.warmup or 0
    if warmup and schedule != "cosine":
        raise UsageError("--warmup works with --schedule cosine")
    if warmup >= epochs:
        raise UsageError(f"--warmup {warmup} must be smaller than the {epochs} epochs")
    return schedule, warmup


def _plan_jobs(run: RunSettings, specs: list[CodeSpec], preset, method: str,
               source: str, device: torch.device) -> list[tuple[CodeSpec, int, Path, Path]]:
    """``(spec, feature dimension D, best checkpoint, last checkpoint)`` of each model to
    train, every one checked (D, memory, no overwrite) before any work."""
    jobs: list[tuple[CodeSpec, int, Path, Path]] = []
    budget, budget_source = memory_budget(device)
    for spec in specs:  # validate every model before any work
        if get_method(method).hashing:  # the feature is the L-bit hash layer itself
            feature_dim = spec.bits
        else:
            feature_dim = run.model.feature_dim or choose_feature_dim(
                spec.num_books, spec.num_words, preset.input_size)
        check_feature_dim(feature_dim, spec.num_books, spec.num_words, method)
        check_quantizer_memory(
            spec, feature_dim, budget, budget_source,
            lambda m, k: run.model.feature_dim or choose_feature_dim(m, k, preset.input_size))
        prefix = f"cross_{source}" if run.data.cross_dataset else source
        name = spec.name or f"{prefix}_{spec.bits}bits.tar"
        # A bare name goes to --checkpoint-dir, as the original's ./checkpoint/NAME.
        best = Path(name) if Path(name).parent.parts else Path(run.output.checkpoint_dir) / name
        last = last_checkpoint_path(best)
        if any(best == job[2] for job in jobs):
            raise UsageError(f"two models of this run would both be saved as {best}: give "
                             f"each one its own --save name")
        check_no_overwrite(best, last, run.training.resume and last.is_file(),
                           run.output.overwrite)
        jobs.append((spec, feature_dim, best, last))
    return jobs


def run_training(run: RunSettings, specs: list[CodeSpec], device: torch.device) -> None:
    """Train one model per spec, each followed by a full evaluation of its saved model."""
    data, training = run.data, run.training
    preset = dataset_preset(data.dataset, cross=data.cross_dataset)
    method = run.model.method_name
    width = run.model.width or preset.width
    epochs = training.epochs or preset.epochs
    schedule, warmup = _schedule_choice(training, epochs)
    margin_type = run.model.margin_type or "cosface"
    backbone, backbone_args = _backbone_choice(run.model, training.resume, preset.input_size,
                                               width)
    source = data.dataset if not data.cross_dataset else (
        "synthface" if data.dataset == "synthface" else "vggface2")
    check_per_rank_batch(training.batch_size or preset.batch_size,
                         int(os.environ.get("WORLD_SIZE", "1")))
    jobs = _plan_jobs(run, specs, preset, method, source, device)
    resuming = [job for job in jobs if job[3].is_file()] if training.resume else []
    if training.resume and not resuming:
        raise UsageError(f"--resume: no last checkpoint to resume from: {jobs[0][3]}")
    model_choice = {"backbone": backbone, "backbone_args": backbone_args,
                    "pretrained": run.model.pretrained, "margin_type": margin_type}
    for spec, feature_dim, best, last in resuming:
        # The class count comes from the data, not read yet: the checkpoint's class head
        # checks it when the run restores it.
        config, settings = resolve_job(run, spec, feature_dim, 0, preset, width, epochs,
                                       source, model_choice, (schedule, warmup), best, last,
                                       resume=True)
        check_resumable(spec, config.to_dict(), last, settings.to_dict())

    dist_info = init_distributed(run.device)
    try:
        # Rank 0 generates data and builds caches first; the others then only read them.
        setup_logging(None, dist_info.is_main)
        if dist_info.distributed and not dist_info.is_main:
            torch.distributed.barrier()
        train_dir, test_dir = prepare_folders(data, cross_train=data.cross_dataset)
        splits = build_splits(train_dir, test_dir, preset.input_size,
                              cache=data.use_cache(preset.cache),
                              progress=data.progress and dist_info.is_main)
        if dist_info.distributed and dist_info.is_main:
            torch.distributed.barrier()
        check_batch_fits(len(splits.train), training.batch_size, preset.batch_size, train_dir)
        try:
            for spec, feature_dim, best, last in jobs:
                # Under --resume a model of a multi-model run that never started starts now.
                _train_one(run, spec, feature_dim, best, last, splits, preset, width, epochs,
                           source, device, dist_info, model_choice, (schedule, warmup),
                           resume=training.resume and last.is_file())
        except KeyboardInterrupt:
            raise TrainingInterrupted(any(job[3].is_file() for job in jobs)) from None
    finally:
        cleanup_distributed()


def resolve_optimizer(training: TrainingOptions, method: str, input_size: int) -> dict:
    """``optimizer``, ``lr``, ``weight_decay``, ``adam_betas`` and ``amsgrad`` of a run of
    ``method``: the flags where given, else the method's defaults (its MethodSpec)."""
    spec = get_method(method)
    optimizer = training.optimizer or spec.optimizer_for(input_size)
    adam = spec.adam_form()
    return {"optimizer": optimizer, "lr": training.lr or spec.default_lr(optimizer),
            "weight_decay": _given(training.weight_decay, spec.default_weight_decay(optimizer)),
            "adam_betas": tuple(training.adam_betas or adam.betas),
            "amsgrad": _given(training.amsgrad, adam.amsgrad)}


def resolve_job(run: RunSettings, spec: CodeSpec, feature_dim: int, num_classes: int, preset,
                width: int, epochs: int, source: str, model_choice: dict,
                schedule: tuple[str, int], best: Path, last: Path,
                resume: bool) -> tuple[OPQNConfig, TrainSettings]:
    """The model configuration and training settings of one job, every default resolved
    (the dataset's, the method's): what it trains with, and what --resume checks a
    checkpoint against."""
    training, model = run.training, run.model
    config = OPQNConfig(
        num_books=spec.num_books, num_words=spec.num_words, feature_dim=feature_dim,
        num_classes=num_classes, input_size=preset.input_size, width=width,
        margin=model.margin, scale=model.scale or preset.scale, miu=model.miu, dataset=source,
        method=model.method_name, **model_choice, params=dict(model.method_fields))
    settings = TrainSettings(
        epochs=epochs, lr_step=preset.lr_step,
        **resolve_optimizer(training, config.method, preset.input_size),
        batch_size=training.batch_size or preset.batch_size,
        workers=run.data.loader_workers(),
        seed=training.seed, eval_every=training.eval_every, best_path=best, last_path=last,
        resume=resume, progress=run.output.progress,
        schedule=schedule[0], warmup=schedule[1], amp=training.amp,
        precise_bn=training.precise_bn)
    return config, settings


def _train_one(run: RunSettings, spec: CodeSpec, feature_dim: int, best: Path, last: Path,
               splits: RetrievalSplits, preset, width: int, epochs: int, source: str,
               device: torch.device, dist_info: DistInfo, model_choice: dict,
               schedule: tuple[str, int] = ("step", 0), resume: bool | None = None) -> None:
    training = run.training
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log = setup_logging(Path(run.output.log_dir) / f"{best.stem}_{stamp}.txt",
                        dist_info.is_main)
    config, settings = resolve_job(run, spec, feature_dim, splits.num_classes, preset, width,
                                   epochs, source, model_choice, schedule, best, last,
                                   training.resume if resume is None else resume)
    lr, settings_batch = settings.lr, settings.batch_size
    log.info("[config] dataset %s%s: %d identities, %d training images, %d test images",
             source, " (cross-dataset training)" if run.data.cross_dataset else "",
             splits.num_classes, len(splits.train), len(splits.queries))
    log.info("[config] method %s%s", config.method, _method_detail(config))
    log.info("[config] %d-bit code: %d codebooks x %d words, D=%d (d=%d), input %dx%d, "
             "width %d, margin %.3f, scale %.1f, miu %.4f, bf16 autocast %s", config.bits,
             config.num_books, config.num_words, config.feature_dim, config.word_dim,
             config.input_size, config.input_size, config.width, config.margin, config.scale, config.miu,
             "on" if resolve_amp(training.amp, device, config.method, training.precise_bn > 0)
             else "off")
    log.info("[config] backbone %s%s%s, %s margin", config.backbone,
             f" {config.backbone_args}" if config.backbone_args else "",
             " (timm pretrained)" if config.pretrained else "", config.margin_type)
    log.info("[config] %d epochs, %s, %s, batch %d, seed %d, device %s%s",
             epochs, describe_optimizer(settings),
             describe_schedule(schedule[0], lr, preset.lr_step, schedule[1]),
             settings_batch, training.seed, device,
             f", {dist_info.world_size} processes" if dist_info.distributed else "")
    state = train(config, settings, splits, device, dist_info)
    if not dist_info.is_main:
        return
    log.info("training done: lowest loss %.4f at epoch %d, saved as %s (last epoch: %s)",
             state.best_loss, state.best_epoch, best, last)
    checkpoint = load_checkpoint(best, map_location=device, required_keys=REQUIRED_KEYS)
    trained = load_model(checkpoint, device)
    extra = {"checkpoint": str(best), "checkpoint_epoch": int(checkpoint["epoch"]),
             "ties": run.evaluation.ties, **training_provenance(checkpoint)}
    split = " (cross_train/cross_test)" if run.data.cross_dataset else ""
    _evaluate_and_report(trained, config, splits, run, device,
                         run.evaluation.topk or preset.top_k, best.stem, extra,
                         title=f"{best.stem} on {source}{split}: precision-recall")


def _given(value, default):
    """A flag's value where it was given (None: not given), else the method's default."""
    return default if value is None else value


def describe_optimizer(settings: TrainSettings) -> str:
    """``sgd (momentum 0.9, weight decay 0.0005)`` or ``adam (betas 0.5/0.999, ...)``."""
    if settings.optimizer == "adam":
        b1, b2 = settings.adam_betas
        return (f"adam (betas {b1:g}/{b2:g}, weight decay {settings.weight_decay:g}, amsgrad "
                f"{'on' if settings.amsgrad else 'off'})")
    return f"sgd (momentum {settings.momentum:g}, weight decay {settings.weight_decay:g})"


def _method_detail(config: OPQNConfig) -> str:
    values = asdict(config.params)

    def show(value) -> str:
        return value if isinstance(value, str) else f"{value:g}"

    return (" (" + ", ".join(f"{n} {show(v)}" for n, v in values.items()) + ")") \
        if values else ""


def _checked_checkpoints(run: RunSettings,
                         specs: list[CodeSpec]) -> list[tuple[Path, dict, OPQN]]:
    """``(path, checkpoint, model built on the CPU)`` of each --load, every one checked
    against the flags before any work."""
    loaded: list[tuple[Path, dict, OPQN]] = []
    for spec in specs:  # every checkpoint is checked before any work
        path = checkpoint_path(spec.name, run.output.checkpoint_dir)
        checkpoint = load_checkpoint(path, map_location="cpu", required_keys=REQUIRED_KEYS)
        config = checked_config(checkpoint, path)
        reconcile_spec(spec, config, path)
        check_evaluation_choice(config, path, run.model.backbone, run.model.method)
        # Built on the CPU now, so that weights that do not fit fail before any work.
        model = checked_model(checkpoint, path)
        if run.evaluation.export_faiss and model.quantizer.faiss_metric is None:
            raise UsageError(f"--export-faiss: faiss cannot express the "
                             f"{model.config.method} score of {path}")
        loaded.append((path, checkpoint, model))
    return loaded


def _export_to_milvus(model: OPQN, path: Path, run: RunSettings, gallery, codes) -> None:
    """-e --milvus: the evaluated gallery's codes ``(N, M)`` into the model's collection."""
    from .milvus_search import export_codes  # pymilvus is imported only with --milvus

    items = readable_items(gallery)
    if items is None or len(items) != codes.shape[0]:
        raise UsageError(f"--milvus: the gallery of {path} has no file list that lines up "
                         f"with its {codes.shape[0]} codes")
    export_codes(model, path, run.milvus, items, codes).close()


def run_evaluation(run: RunSettings, specs: list[CodeSpec], device: torch.device) -> None:
    """Evaluate each checkpoint of --load on --dataset (gallery = train, queries = test)."""
    log = setup_logging(None)
    data, evaluation = run.data, run.evaluation
    loaded = _checked_checkpoints(run, specs)
    preset = dataset_preset(data.dataset)
    k = evaluation.topk or preset.top_k
    train_dir, test_dir = prepare_folders(data, cross_train=False)
    evaluated = set(identity_folders(train_dir)) | set(identity_folders(test_dir))
    overlaps = []
    for path, checkpoint, _model in loaded:  # the protocol is checked before any work
        trained_on = checkpoint.get("classes", [])
        overlaps.append(check_identity_overlap(
            trained_on, evaluated, path, allow=not data.cross_dataset
            or data.allow_identity_overlap))
    splits_by_size: dict[int, RetrievalSplits] = {}
    curves = []
    for index, (path, checkpoint, model) in enumerate(loaded):
        config = OPQNConfig.from_dict(checkpoint["config"])
        if data.cross_dataset and config.input_size != 112:
            log.warning("warning: -c expects a 112x112 cross-dataset model; %s was trained at "
                        "%dx%d", path, config.input_size, config.input_size)
        if config.input_size not in splits_by_size:
            splits_by_size[config.input_size] = build_splits(
                train_dir, test_dir, config.input_size, with_train=False,
                cache=data.use_cache(preset.cache), progress=data.progress)
        splits = splits_by_size[config.input_size]
        overlap = len(overlaps[index])
        if data.cross_dataset and overlap:
            log.warning("warning: %d evaluated identities were also training identities of "
                        "%s (--allow-identity-overlap)", overlap, path)
        model = model.to(device)
        log.info("evaluating %s (%s, %d-bit, %dx%d) on %s", path, config.method, config.bits,
                 config.num_books, config.num_words, data.dataset)
        # Its own name, never the training-time result's <stem>.json (see docs/usage.md, "Outputs").
        stem = f"{path.stem}_on_{data.dataset}{'_cross' if data.cross_dataset else ''}"
        extra = {"checkpoint": str(path), "checkpoint_epoch": int(checkpoint.get("epoch", 0)),
                 "ties": evaluation.ties, "identity_overlap": overlap,
                 **training_provenance(checkpoint)}
        title = (f"cross-dataset: {path.stem} on {data.dataset} (unseen identities)"
                 if data.cross_dataset else f"{path.stem} on {data.dataset}: precision-recall")
        result, (codes, _labels) = _evaluate_and_report(model, config, splits, run, device, k,
                                                        stem, extra, title=title)
        examples = write_examples(model, splits.gallery, splits.queries, codes, run, device,
                                  stem)
        if examples is not None:
            log.info("retrieval examples: %s", examples)
        curves.append((curve_label({**checkpoint["config"], **result}, path.stem),
                       result["pr_curve"]))
        if evaluation.export_faiss:
            export_gallery_index(model, codes, splits.gallery,
                                 export_path(evaluation.export_faiss[index], run.output.out),
                                 evaluation.index_type, evaluation.nlist, evaluation.nprobe)
        if run.milvus.uri:
            _export_to_milvus(model, path, run, splits.gallery, codes)
    if len(curves) > 1:
        path = write_pr_comparison(curves, run.output.out, data.dataset, data.cross_dataset)
        log.info("PR curves of all models: %s", path)

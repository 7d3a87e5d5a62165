"""What ``opqn_main.py`` runs: training jobs and evaluation jobs, wired from the pieces.

Both flows take a :class:`utils.cli.settings.RunSettings` and hand each helper the group it
reads.
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

import torch

from data.datasets import dataset_preset, readable_items
from data.folders import identity_folders
from data.loaders import RetrievalSplits, build_splits, make_loader
from models import (DEFAULT_BACKBONE, BackboneError, NetConfig, PretrainedUnavailable,
                    RetrievalNet, build_backbone, parse_backbone_args)
from utils.checkpoints import (checkpoint_path, last_checkpoint_path, load_checkpoint,
                               load_model)
from utils.logger import get_logger, setup_logging
from utils.precision import resolve_amp
from utils.retrieval.encoding import evaluate_model
from utils.retrieval.export import export_gallery_index, export_path
from utils.runtime import DistInfo, cleanup_distributed, init_distributed, memory_budget
from utils.training.config import (TrainingConfig, resolve_feature_dim, resolve_training,
                                   with_classes)
from utils.training.loop import TrainingInterrupted, TrainSettings, check_per_rank_batch, train
from utils.training.schedules import describe_schedule

from .checkpoint_checks import (REQUIRED_KEYS, check_evaluation_choice, check_resumable,
                                checked_config, checked_model, reconcile_spec)
from .data_folders import prepare_folders
from .reporting import (curve_label, result_metadata, summary_line, training_provenance,
                        write_pr_comparison, write_result)
from .search import write_examples
from .settings import ModelSettings, RunSettings
from .validation import (CodeSpec, UsageError, check_batch_fits,
                         check_feature_dim, check_identity_overlap, check_no_overwrite,
                         check_quantizer_memory)


def _evaluate_and_report(model, config: NetConfig, splits: RetrievalSplits, run: RunSettings,
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


def _check_backbone(model: ModelSettings, resume: bool, input_size: int, width: int) -> None:
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


def _plan_jobs(run: RunSettings, specs: list[CodeSpec], preset, source: str,
               device: torch.device) -> list[tuple[CodeSpec, TrainingConfig]]:
    """Each model to train with its configuration, resolved once (preset, method, flags;
    the class count comes with the data), every one checked (D, memory, no overwrite)
    before any work."""
    jobs: list[tuple[CodeSpec, TrainingConfig]] = []
    budget, budget_source = memory_budget(device)
    for spec in specs:  # validate every model before any work
        prefix = f"cross_{source}" if run.data.cross_dataset else source
        name = spec.name or f"{prefix}_{spec.bits}bits.tar"
        # A bare name goes to --checkpoint-dir, as the original's ./checkpoint/NAME.
        best = Path(name) if Path(name).parent.parts else Path(run.output.checkpoint_dir) / name
        last = last_checkpoint_path(best)
        job = resolve_training(run.model, run.training, preset, num_books=spec.num_books,
                               num_words=spec.num_words, num_classes=0, source=source,
                               best_path=best, last_path=last,
                               workers=run.data.loader_workers(), progress=run.output.progress)
        config = job.model
        check_feature_dim(config.feature_dim, spec.num_books, spec.num_words, config.method)
        check_quantizer_memory(spec, config.feature_dim, budget, budget_source,
                               lambda m, k: resolve_feature_dim(run.model, m, k,
                                                                preset.input_size))
        if any(best == other.settings.best_path for _spec, other in jobs):
            raise UsageError(f"two models of this run would both be saved as {best}: give "
                             f"each one its own --save name")
        check_no_overwrite(best, last, run.training.resume and last.is_file(),
                           run.output.overwrite)
        jobs.append((spec, job))
    return jobs


def run_training(run: RunSettings, specs: list[CodeSpec], device: torch.device) -> None:
    """Train one model per spec, each followed by a full evaluation of its saved model."""
    data, training = run.data, run.training
    preset = dataset_preset(data.dataset, cross=data.cross_dataset)
    _check_backbone(run.model, training.resume, preset.input_size,
                    run.model.width or preset.width)
    source = data.dataset if not data.cross_dataset else (
        "synthface" if data.dataset == "synthface" else "vggface2")
    check_per_rank_batch(training.batch_size or preset.batch_size,
                         int(os.environ.get("WORLD_SIZE", "1")))
    jobs = _plan_jobs(run, specs, preset, source, device)
    resuming = [(spec, job) for spec, job in jobs
                if training.resume and job.settings.last_path.is_file()]
    if training.resume and not resuming:
        raise UsageError(f"--resume: no last checkpoint to resume from: "
                         f"{jobs[0][1].settings.last_path}")
    for spec, job in resuming:
        # The class count comes from the data, not read yet: the checkpoint's class head
        # checks it when the run restores it.
        check_resumable(spec, job.model.to_dict(), job.settings.last_path,
                        replace(job.settings, resume=True).to_dict())

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
            for _spec, job in jobs:
                # Under --resume a model of a multi-model run that never started starts now.
                resume = training.resume and job.settings.last_path.is_file()
                _train_one(run, with_classes(job, splits.num_classes, resume), splits, preset,
                           device, dist_info)
        except KeyboardInterrupt:
            raise TrainingInterrupted(any(job.settings.last_path.is_file()
                                          for _spec, job in jobs)) from None
    finally:
        cleanup_distributed()


def _train_one(run: RunSettings, job: TrainingConfig, splits: RetrievalSplits, preset,
               device: torch.device, dist_info: DistInfo) -> None:
    config, settings = job.model, job.settings
    best = settings.best_path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log = setup_logging(Path(run.output.log_dir) / f"{best.stem}_{stamp}.txt",
                        dist_info.is_main)
    log.info("[config] dataset %s%s: %d identities, %d training images, %d test images",
             config.dataset, " (cross-dataset training)" if run.data.cross_dataset else "",
             splits.num_classes, len(splits.train), len(splits.queries))
    log.info("[config] method %s%s", config.method, _method_detail(config))
    log.info("[config] %d-bit code: %d codebooks x %d words, D=%d (d=%d), input %dx%d, "
             "width %d, margin %.3f, scale %.1f, miu %.4f, bf16 autocast %s", config.bits,
             config.num_books, config.num_words, config.feature_dim, config.word_dim,
             config.input_size, config.input_size, config.width, config.margin, config.scale,
             config.miu, "on" if resolve_amp(settings.amp, device, config.method,
                                             settings.precise_bn > 0) else "off")
    log.info("[config] backbone %s%s%s, %s margin", config.backbone,
             f" {config.backbone_args}" if config.backbone_args else "",
             " (timm pretrained)" if config.pretrained else "", config.margin_type)
    log.info("[config] %d epochs, %s, %s, batch %d, seed %d, device %s%s",
             settings.epochs, describe_optimizer(settings),
             describe_schedule(settings.schedule, settings.lr, settings.lr_step,
                               settings.warmup),
             settings.batch_size, settings.seed, device,
             f", {dist_info.world_size} processes" if dist_info.distributed else "")
    state = train(config, settings, splits, device, dist_info)
    if not dist_info.is_main:
        return
    log.info("training done: lowest loss %.4f at epoch %d, saved as %s (last epoch: %s)",
             state.best_loss, state.best_epoch, best, settings.last_path)
    checkpoint = load_checkpoint(best, map_location=device, required_keys=REQUIRED_KEYS)
    trained = load_model(checkpoint, device)
    extra = {"checkpoint": str(best), "checkpoint_epoch": int(checkpoint["epoch"]),
             "ties": run.evaluation.ties, **training_provenance(checkpoint)}
    split = " (cross_train/cross_test)" if run.data.cross_dataset else ""
    _evaluate_and_report(trained, config, splits, run, device,
                         run.evaluation.topk or preset.top_k, best.stem, extra,
                         title=f"{best.stem} on {config.dataset}{split}: precision-recall")


def describe_optimizer(settings: TrainSettings) -> str:
    """``sgd (momentum 0.9, weight decay 0.0005)`` or ``adam (betas 0.5/0.999, ...)``."""
    if settings.optimizer == "adam":
        b1, b2 = settings.adam_betas
        return (f"adam (betas {b1:g}/{b2:g}, weight decay {settings.weight_decay:g}, amsgrad "
                f"{'on' if settings.amsgrad else 'off'})")
    return f"sgd (momentum {settings.momentum:g}, weight decay {settings.weight_decay:g})"


def _method_detail(config: NetConfig) -> str:
    values = asdict(config.params)

    def show(value) -> str:
        return value if isinstance(value, str) else f"{value:g}"

    return (" (" + ", ".join(f"{n} {show(v)}" for n, v in values.items()) + ")") \
        if values else ""


def _checked_checkpoints(run: RunSettings,
                         specs: list[CodeSpec]) -> list[tuple[Path, dict, RetrievalNet]]:
    """``(path, checkpoint, model built on the CPU)`` of each --load, every one checked
    against the flags before any work."""
    loaded: list[tuple[Path, dict, RetrievalNet]] = []
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


def _export_to_milvus(model: RetrievalNet, path: Path, run: RunSettings, gallery, codes) -> None:
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
        config = NetConfig.from_dict(checkpoint["config"])
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

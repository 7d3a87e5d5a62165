"""Encode a gallery and queries with a trained OPQN model and score retrieval."""
from __future__ import annotations

import time

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.datasets import report_broken
from models import OPQN

from .retrieval import evaluate_adc
from .runtime import metrics_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def extract_features(model: OPQN, loader: DataLoader, device: torch.device,
                     desc: str = "features", progress: bool = True) -> tuple[Tensor, Tensor]:
    """Backbone features of a whole loader.

    Returns:
        ``(features, labels)``: float32 ``(N, D)`` and int64 ``(N,)``, on ``device``.
    """
    was_training = model.training
    model.eval()
    feats, labels = [], []
    autocast = device.type == "cuda"
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            report_broken(loader.dataset, batch.broken)
            if batch.labels.numel() == 0:  # every image of the batch failed to decode
                continue
            images, targets = batch.images, batch.labels
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(images)
            feats.append(out.float())
            labels.append(targets.to(device))
    finally:
        model.train(was_training)
    if not feats:
        raise RuntimeError(f"no readable images to {desc}")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def encode_gallery(model: OPQN, loader: DataLoader, device: torch.device,
                   progress: bool = True) -> tuple[Tensor, Tensor]:
    """Hard codes of a gallery: ``(codes (N, M) uint8 when K <= 256, labels (N,))``."""
    feats, labels = extract_features(model, loader, device, "encode gallery", progress)
    return model.quantizer.encode(feats), labels


@torch.no_grad()
def encode_queries(model: OPQN, loader: DataLoader, device: torch.device,
                   progress: bool = True) -> tuple[Tensor, Tensor]:
    """Lookup tables of the queries: ``(tables (Q, M, K) float32, labels (Q,))``."""
    feats, labels = extract_features(model, loader, device, "encode queries", progress)
    return model.quantizer.query_tables(feats), labels


def evaluate_model(model: OPQN, gallery_loader: DataLoader, query_loader: DataLoader,
                   device: torch.device, k: int, ties: str = "expected",
                   progress: bool = True) -> tuple[dict, Tensor, Tensor]:
    """Full retrieval evaluation: the gallery is the database, the queries are ranked
    against it by asymmetric scores.

    Returns:
        ``(result, codes, gallery_labels)``: the metric dict of
        :func:`utils.retrieval.evaluate_adc` plus ``encode_seconds`` (feature extraction and
        encoding) and ``search_seconds`` (scoring and metrics alone), and the gallery codes.
    """
    start = time.perf_counter()
    codes, gallery_labels = encode_gallery(model, gallery_loader, device, progress)
    tables, query_labels = encode_queries(model, query_loader, device, progress)
    _sync(device)
    encoded = time.perf_counter()
    where = metrics_device(device)  # the CPU for MPS: the metrics need float64
    result = evaluate_adc(tables.to(where), codes.to(where), query_labels.to(where),
                          gallery_labels.to(where), k=k, ties=ties)
    _sync(device)
    result["encode_seconds"] = encoded - start
    result["search_seconds"] = time.perf_counter() - encoded
    return result, codes, gallery_labels

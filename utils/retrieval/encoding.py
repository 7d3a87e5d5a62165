"""Encode a gallery and queries with a trained OPQN model and score retrieval."""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.datasets import report_broken
from models import RetrievalNet
from utils.precision import autocast, run_fp32, to_memory_format
from utils.runtime import metrics_device

from .adc import evaluate_adc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _feature_batches(model: RetrievalNet, loader: DataLoader, device: torch.device, desc: str,
                     progress: bool, amp: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """Backbone features ``(B, D)`` float32 and labels ``(B,)`` of each readable batch, in
    eval mode; the backbone runs under bf16 autocast when ``amp``."""
    was_training = model.training
    model.eval()
    readable = 0
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            report_broken(loader.dataset, batch.broken)
            if batch.labels.numel() == 0:  # every image of the batch failed to decode
                continue
            images = to_memory_format(batch.images.to(device, non_blocking=True), amp)
            with autocast(device, amp):
                out = model(images)
            readable += batch.labels.numel()
            yield out.float(), batch.labels.to(device)
    finally:
        model.train(was_training)
    if not readable:
        raise RuntimeError(f"no readable images to {desc}")


@torch.no_grad()
def extract_features(model: RetrievalNet, loader: DataLoader, device: torch.device,
                     desc: str = "features", progress: bool = True,
                     amp: bool = False) -> tuple[Tensor, Tensor]:
    """Backbone features of a whole loader.

    Returns:
        ``(features, labels)``: float32 ``(N, D)`` and int64 ``(N,)``, on ``device``.
    """
    feats, labels = zip(*_feature_batches(model, loader, device, desc, progress, amp))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def _encode_batches(model: RetrievalNet, loader: DataLoader, device: torch.device, desc: str,
                    progress: bool, amp: bool, encode) -> tuple[Tensor, Tensor]:
    # Batch by batch: only the encoded rows are kept, never the (N, D) features.
    out, labels = [], []
    for feats, targets in _feature_batches(model, loader, device, desc, progress, amp):
        out.append(run_fp32(encode, feats))
        labels.append(targets)
    return torch.cat(out), torch.cat(labels)


@torch.no_grad()
def encode_gallery(model: RetrievalNet, loader: DataLoader, device: torch.device,
                   progress: bool = True, amp: bool = False) -> tuple[Tensor, Tensor]:
    """Hard codes of a gallery: ``(codes (N, M) uint8 when K <= 256, labels (N,))``.

    Encoded batch by batch (memory O(N·M)); the features may come from bf16 autocast
    (``amp``), the codes are computed in float32."""
    return _encode_batches(model, loader, device, "encode gallery", progress, amp,
                           model.quantizer.encode)


@torch.no_grad()
def encode_queries(model: RetrievalNet, loader: DataLoader, device: torch.device,
                   progress: bool = True, amp: bool = False) -> tuple[Tensor, Tensor]:
    """Lookup tables of the queries: ``(tables (Q, M, K) float32, labels (Q,))``, built batch
    by batch (queries are held as tables, not features)."""
    return _encode_batches(model, loader, device, "encode queries", progress, amp,
                           model.quantizer.query_tables)


@torch.no_grad()
def encode_faiss_queries(model: RetrievalNet, loader: DataLoader, device: torch.device,
                         progress: bool = True, amp: bool = False) -> tuple[Tensor, Tensor]:
    """The queries as a faiss index of the head expects them: ``(vectors, labels (Q,))``,
    vectors float32 ``(Q, D')`` (uint8 bits ``(Q, L)`` for dcdh), batch by batch."""
    return _encode_batches(model, loader, device, "encode queries", progress, amp,
                           model.quantizer.faiss_queries)


def evaluate_model(model: RetrievalNet, gallery_loader: DataLoader, query_loader: DataLoader,
                   device: torch.device, k: int, ties: str = "expected",
                   progress: bool = True, amp: bool = False) -> tuple[dict, Tensor, Tensor]:
    """Full retrieval evaluation: the gallery is the database, the queries are ranked
    against it by asymmetric scores.

    Returns:
        ``(result, codes, gallery_labels)``: the metric dict of
        :func:`utils.retrieval.adc.evaluate_adc` plus ``amp`` (whether the backbone ran in
        bf16), ``encode_seconds`` (feature extraction and
        encoding) and ``search_seconds`` (scoring and metrics alone), and the gallery codes.
    """
    start = time.perf_counter()
    if amp:  # channels_last follows bf16
        model = model.to(memory_format=torch.channels_last)
    codes, gallery_labels = encode_gallery(model, gallery_loader, device, progress, amp)
    tables, query_labels = encode_queries(model, query_loader, device, progress, amp)
    _sync(device)
    encoded = time.perf_counter()
    where = metrics_device(device)  # the CPU for MPS: the metrics need float64
    result = evaluate_adc(tables.to(where), codes.to(where), query_labels.to(where),
                          gallery_labels.to(where), k=k, ties=ties)
    _sync(device)
    result["amp"] = bool(amp)
    result["encode_seconds"] = encoded - start
    result["search_seconds"] = time.perf_counter() - encoded
    return result, codes, gallery_labels

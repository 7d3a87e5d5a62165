"""Sharded gallery encoding and sharded IVF building, in one process or under torchrun.

Encoding the gallery is the slow part of a search, so it is split into shards: contiguous
ranges of the sorted gallery files, about ``SHARD_ITEMS`` each and at least one per
process. Process ``r`` of ``W`` encodes shards ``r, r + W, ...`` and writes each to
``<index>.shards/shard-<start>-<end>.tar`` (codes, gallery positions and both fingerprints).
A shard whose fingerprints match the current model and gallery is reused, so an interrupted
encoding resumes from the shards it has finished. Process 0 merges the shards into the
gallery index (:mod:`utils.retrieval.gallery_index`) and removes them.

The IVF index is built the same way (:func:`open_or_build_ivf`): process 0 trains the coarse
quantizer, every process adds its ranges of codes to a copy of it and writes an IVF shard
file, and process 0 merges those into on-disk inverted lists (``lists.ivfdata``), which
faiss memory-maps at search time. The IVF folder's ``meta.json`` holds the
model and gallery fingerprints; a folder that does not match them is rebuilt.

All processes must see the same file system (the folder of ``--index``). Only process 0
writes the merged files.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from models.methods import QuantHead
from utils.atomic_io import atomic_write_text
from utils.checkpoints.store import load_checkpoint, save_checkpoint
from utils.errors import UsageError
from utils.logger import get_logger
from utils.runtime import DistInfo

from .faiss_index import load_faiss_index, save_faiss_index
from .gallery_index import GalleryIndex
from .ivf_index import (
    FaissIndex,
    add_to_ivf,
    merge_on_disk,
    read_ivf,
    set_nprobe,
    train_ivf,
)

SHARD_KIND = "opqn-gallery-shard"
IVF_KIND = "opqn-ivf-index"
# Items per encoding shard: what an interruption can cost at most, per process.
SHARD_ITEMS = 20_000

Encoder = Callable[[list[str]], tuple[Tensor, Tensor]]


def barrier(info: DistInfo) -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if info.distributed:
        dist.barrier()


def shard_ranges(n: int, world_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``0..n-1``: about ``SHARD_ITEMS`` long, at least one
    per process (when ``n`` allows), as even as possible."""
    count = max(1, min(max(n, 1), max(world_size, math.ceil(n / SHARD_ITEMS))))
    return [(i * n // count, (i + 1) * n // count) for i in range(count)]


def shard_dir(index_path: Path) -> Path:
    """Where the encoding shards of ``index_path`` live while it is built."""
    return index_path.with_name(index_path.name + ".shards")


class ShardedEncoder:
    """An encoder for :func:`utils.retrieval.gallery_index.open_or_build` that encodes this
    process's shards (reusing finished ones), waits for the others and, in process 0, returns the
    merged ``(codes (n, M), positions (n,))``; other processes return empty tensors.

    Args:
        encode: absolute paths -> ``(codes, positions)`` of the readable ones, returning
            ``(M`` columns, 0 rows) when none is readable.
        fingerprints: ``(model, gallery)`` SHA-256 strings the shards must carry.
        reuse: resume from finished shards (False for ``--rebuild-index``).
    """

    def __init__(self, encode: Encoder, directory: Path, fingerprints: tuple[str, str],
                 info: DistInfo, reuse: bool = True) -> None:
        self.encode, self.directory, self.info = encode, directory, info
        self.fingerprints, self.reuse = fingerprints, reuse
        self.encoded = self.reused = 0

    def _file(self, start: int, end: int) -> Path:
        return self.directory / f"shard-{start:010d}-{end:010d}.tar"

    def _current(self, path: Path, start: int, end: int) -> dict | None:
        if not path.exists():
            return None
        try:
            shard = load_checkpoint(path, required_keys=("kind",))
        except Exception:  # noqa: BLE001 - a damaged shard is encoded again
            return None
        same = (shard.get("kind") == SHARD_KIND and shard.get("start") == start
                and shard.get("end") == end
                and (shard.get("model_fingerprint"), shard.get("gallery_fingerprint"))
                == self.fingerprints)
        return shard if same else None

    def __call__(self, paths: list[str]) -> tuple[Tensor, Tensor]:
        log = get_logger()
        ranges = shard_ranges(len(paths), self.info.world_size)
        self.directory.mkdir(parents=True, exist_ok=True)
        mine = ranges[self.info.rank :: self.info.world_size]
        for number, (start, end) in enumerate(mine, 1):
            path = self._file(start, end)
            if self.reuse and self._current(path, start, end) is not None:
                self.reused += 1
                continue
            codes, positions = self.encode(paths[start:end])
            save_checkpoint({"kind": SHARD_KIND, "start": start, "end": end,
                             "codes": codes.cpu().contiguous(),
                             "positions": positions.cpu().to(torch.int64) + start,
                             "model_fingerprint": self.fingerprints[0],
                             "gallery_fingerprint": self.fingerprints[1]}, path)
            self.encoded += 1
            log.info("process %d: shard %d/%d encoded (gallery items %d-%d)", self.info.rank,
                     number, len(mine), start, end - 1)
        if self.reused:
            log.info("process %d: %d of its %d shard(s) reused from %s", self.info.rank,
                     self.reused, len(mine), self.directory)
        barrier(self.info)
        if not self.info.is_main:
            return torch.empty(0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        shards = [self._current(self._file(*r), *r) for r in ranges]
        missing = [self._file(*r).name for r, s in zip(ranges, shards) if s is None]
        if missing:
            raise RuntimeError(f"gallery shard(s) missing or stale after encoding: "
                               f"{', '.join(missing[:3])} in {self.directory}")
        codes = torch.cat([s["codes"] for s in shards])
        if codes.shape[0] == 0:
            raise UsageError(f"none of the {len(paths)} gallery images could be read")
        return codes, torch.cat([s["positions"] for s in shards])

    def cleanup(self) -> None:
        """Remove the shards once the merged index is saved (process 0)."""
        if self.info.is_main:
            shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------------------
# IVF
# --------------------------------------------------------------------------------------


def ivf_dir(index_path: Path, nlist: int) -> Path:
    """``<index>.ivf<nlist>/``: the merged IVF index, its lists and its shards."""
    return index_path.with_name(f"{index_path.name}.ivf{nlist}")


def _ivf_meta(index: GalleryIndex, head: QuantHead, nlist: int) -> dict:
    return {"kind": IVF_KIND, "method": head.method, "nlist": nlist, "ntotal": len(index),
            "model_fingerprint": index.model_fingerprint,
            "gallery_fingerprint": index.gallery_fingerprint}


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def open_or_build_ivf(head: QuantHead, index: GalleryIndex, index_path: Path, nlist: int,
                      nprobe: int, info: DistInfo,
                      seed: int = 0) -> tuple[FaissIndex | None, str, Path]:
    """The IVF index of ``index``'s codes: reused from ``<index>.ivf<nlist>/`` when its
    fingerprints match, else built there (sharded over the processes, merged on disk).

    Returns ``(faiss index or None, status, folder)``: process 0 gets the merged index,
    memory-mapped, with ``nprobe`` set; other processes get None.
    Raises ``UsageError`` when ``nlist`` exceeds the gallery size.
    """
    if nlist > len(index):
        raise UsageError(f"--nlist {nlist} exceeds the {len(index)} gallery items: give "
                         f"--nlist {len(index)} or fewer")
    folder = ivf_dir(index_path, nlist)
    meta_path, merged_path = folder / "meta.json", folder / "index.faiss"
    meta = _ivf_meta(index, head, nlist)
    stored = _read_meta(meta_path)
    if stored == meta and merged_path.exists():
        status = "reused"
    else:
        status = "built" if stored is None else "rebuilt (the model or the gallery changed)"
        trained_path = folder / "trained.faiss"
        ranges = shard_ranges(len(index), info.world_size)
        shard_files = [folder / f"shard-{a:010d}-{b:010d}.faiss" for a, b in ranges]
        if info.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            save_faiss_index(train_ivf(head, index.codes, nlist, seed), trained_path)
        barrier(info)
        for (start, end), path in list(zip(ranges, shard_files))[info.rank :: info.world_size]:
            shard = load_faiss_index(trained_path)
            add_to_ivf(shard, head, index.codes[start:end], torch.arange(start, end))
            save_faiss_index(shard, path)
        barrier(info)
        if info.is_main:
            merged = merge_on_disk(load_faiss_index(trained_path), shard_files,
                                   folder / "lists.ivfdata")
            save_faiss_index(merged, merged_path)
            trained_path.unlink()
            atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
        barrier(info)
    if not info.is_main:
        return None, status, folder
    ivf = read_ivf(merged_path)  # the lists stay on disk, memory-mapped
    set_nprobe(ivf, nprobe)
    return ivf, status, folder

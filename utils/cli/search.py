"""``--search``: photos in, ranked gallery out, with a picture of it.

The gallery (a folder of images, an ``<identity>/`` layout optional; by default
``--dataset``'s train split) is encoded once into a saved index
(:mod:`utils.retrieval.gallery_index`) and reused while the model and the gallery files are
unchanged. Each query (files, folders,
or ``--dataset``'s test split) is scored against the whole gallery by the model's asymmetric
query tables with the top-k search :func:`utils.retrieval.adc.search_adc`.

Codes and tables come from :func:`utils.retrieval.encoding.encode_gallery` and
:func:`utils.retrieval.encoding.encode_queries`, the same functions the evaluation uses, so a
search ranks exactly as ``-e`` scores. The gallery is encoded in shards
(:mod:`utils.retrieval.shards`), split over the processes under torchrun and resumed after an
interruption; process 0 alone searches and writes the results. ``--index-type ivf`` searches an inverted-file index over
the same codes (:mod:`utils.retrieval.ivf_index`) with the head's faiss query vectors instead.

Outputs under ``--out``: ``search.json`` (every query's ranked paths, identities, scores),
``search.png`` (the retrieval grid of the first ``--grid-rows`` queries) and
``search.html`` (the grid of up to ``HTML_ROWS`` queries, images embedded).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from data.datasets import ImageList, list_images, readable_items
from data.loaders import make_loader
from data.transforms import build_transform
from models import RetrievalNet
from models.methods import code_dtype
from utils.checkpoints.store import checkpoint_path, load_checkpoint
from utils.logger import get_logger, setup_logging
from utils.retrieval import encoding
from utils.retrieval.adc import search_adc
from utils.retrieval.faiss_index import search_head_queries
from utils.retrieval.gallery_index import (
    GalleryIndex,
    load_index,
    model_fingerprint,
    open_or_build,
    scan_gallery,
)
from utils.retrieval.ivf_index import default_nlist, default_nprobe
from utils.retrieval.shards import ShardedEncoder, barrier, open_or_build_ivf, shard_dir
from utils.runtime import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
)

from .checkpoint_checks import REQUIRED_KEYS, checked_model
from .data_folders import prepare_folders
from .gallery_view import (DEFAULT_TOPK, HTML_ROWS, GridRow, Hit, draw_grid, rows_json,
                           write_search_outputs)
from .settings import RunSettings
from .validation import UsageError

EXAMPLE_QUERIES = 8
EXAMPLE_SEED = 0


def default_index_path(out_dir: str | Path, checkpoint: Path, gallery_root: Path) -> Path:
    """``<out>/<checkpoint stem>_<gallery parent>_<gallery name>.index.tar``."""
    tail = "_".join(p for p in gallery_root.resolve().parts[-2:] if p not in ("/", ""))
    tail = re.sub(r"[^\w.-]+", "_", tail)
    return Path(out_dir) / f"{checkpoint.stem}_{tail}.index.tar"


def collect_queries(entries: list[str]) -> tuple[list[Path], list[str]]:
    """Query files from files and folders; returns (files, paths that do not exist)."""
    files, missing = [], []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            files += list_images(path)
        elif path.exists():
            files.append(path)
        else:
            missing.append(entry)
    return files, missing


_ENCODERS = {"gallery": "encode_gallery", "query": "encode_queries",
             "faiss-query": "encode_faiss_queries"}


def _encoder(model: RetrievalNet, run: RunSettings, device: torch.device, which: str,
             allow_empty: bool = False):
    """paths -> (codes, tables or faiss query vectors, positions of the readable paths), via
    utils.retrieval.encoding; with ``allow_empty`` no readable image gives ``(M`` columns, 0
    rows)."""
    transform = build_transform(model.config.input_size, train=False)
    fn = getattr(encoding, _ENCODERS[which])  # looked up late: tests replace them

    def encode(paths: list[str]) -> tuple[Tensor, Tensor]:
        loader = make_loader(ImageList(paths, transform), run.evaluation.inference_batch,
                             run.data.loader_workers(), device)
        try:
            return fn(model, loader, device, progress=run.output.progress)
        except RuntimeError as exc:
            if "no readable images" not in str(exc):
                raise
            if allow_empty:
                books = model.quantizer.num_books
                return (torch.empty(0, books, dtype=code_dtype(model.config.num_words)),
                        torch.empty(0, dtype=torch.int64))
            raise UsageError(f"none of the {len(paths)} {which} images could be read")
    return encode


def rank(tables: Tensor, index: GalleryIndex, topk: int) -> tuple[Tensor, Tensor]:
    """Top-k ``(scores, positions)`` ``(Q, k')`` of each query, ``k' = min(topk, N)``."""
    codes = index.codes.to(tables.device)
    return search_adc(tables, codes, min(topk, len(index)))


def ranked_rows(query_paths: list[str], query_identities: list[str | None], scores: Tensor,
                positions: Tensor, gallery_paths: list[str],
                gallery_identities: list[str | None]) -> list[GridRow]:
    """Rows of hits; ``correct`` is set where the query's identity is known."""
    rows = []
    for q, (qpath, qid) in enumerate(zip(query_paths, query_identities)):
        hits = []
        for score, pos in zip(scores[q].tolist(), positions[q].tolist()):
            if pos < 0:
                continue
            gid = gallery_identities[pos]
            hits.append(Hit(gallery_paths[pos], gid, float(score),
                            None if qid is None else gid == qid))
        rows.append(GridRow(qpath, qid, hits))
    return rows


def run_search(run: RunSettings, device: torch.device) -> dict:
    """The whole ``--search`` command; returns the JSON written to ``search.json`` (an empty
    dict in the other processes of a torchrun job, which only encode and build shards)."""
    log = setup_logging(None)
    info = init_distributed(run.device)
    try:
        return _run_search(run, device, info, log)
    finally:
        cleanup_distributed()


def _run_search(run: RunSettings, device: torch.device, info: DistInfo, log) -> dict:
    model, ckpt = load_search_model(run, device)
    if run.milvus.uri:
        return _search_milvus(run, device, info, model, ckpt, log)
    folders = _DatasetFolders(run)
    options = run.search
    gallery = scan_gallery(Path(options.gallery) if options.gallery else folders.train())
    query_files, missing = query_files_of(run, folders, log)
    index, index_path, status = open_gallery_index(model, ckpt, gallery, run, device, info, log)
    ivf, ivf_info = open_ivf(model, index, index_path, run, info, log)
    if not info.is_main:  # only process 0 searches and writes the results
        return {}
    topk = options.topk or DEFAULT_TOPK
    rows, unreadable = rank_queries(model, run, device, index, gallery, ivf, query_files, topk)
    unreadable += missing
    result = {
        "checkpoint": str(ckpt),
        "bits": model.config.bits, "num_books": model.config.num_books,
        "num_words": model.config.num_words,
        "gallery": str(gallery.root), "gallery_size": len(index),
        "gallery_unreadable": [str(gallery.root / p) for p in index.skipped],
        "index": str(index_path), "index_status": status, "index_type": options.index_type,
        **ivf_info,
        "topk": topk, "score": "sum_m P_m[code_m] (asymmetric, higher is closer)",
        "queries": rows_json(rows),
        "unreadable_queries": unreadable,
    }
    write_results(run, result, rows, topk, f"{ckpt.stem}: top-{topk} of {len(index)} gallery "
                  f"images", unreadable, log)
    return result


def load_search_model(run: RunSettings, device: torch.device) -> tuple[RetrievalNet, Path]:
    """``--load``'s model on ``device`` and its checkpoint path (checked: one-line errors)."""
    ckpt = checkpoint_path(run.search.load, run.output.checkpoint_dir)
    model = checked_model(load_checkpoint(ckpt, map_location="cpu",
                                          required_keys=REQUIRED_KEYS), ckpt).to(device)
    return model, ckpt


class _DatasetFolders:
    """``--dataset``'s train and test folders, prepared only when a default needs them."""

    def __init__(self, run: RunSettings) -> None:
        self._run, self._dirs = run, None

    def _get(self) -> tuple[Path, Path]:
        if self._dirs is None:
            self._dirs = prepare_folders(self._run.data, cross_train=False)
        return self._dirs

    def train(self) -> Path:
        return self._get()[0]

    def test(self) -> Path:
        return self._get()[1]


def query_files_of(run: RunSettings, folders: _DatasetFolders, log) -> tuple[list[Path],
                                                                             list[str]]:
    """``--query``'s image files (default: ``--dataset``'s test split) and the entries that
    do not exist (warned); ``UsageError`` when there is no image at all."""
    entries = list(run.search.query) or [str(folders.test())]
    files, missing = collect_queries(entries)
    for entry in missing:
        log.warning("query not found: %s", entry)
    if not files:
        raise UsageError(f"no query images in --query {' '.join(entries)}")
    return files, missing


def open_gallery_index(model: RetrievalNet, ckpt: Path, gallery, run: RunSettings,
                       device: torch.device, info: DistInfo, log):
    """The gallery's codes: reused from the index file, or encoded (in shards, by every
    process of a torchrun job) and saved. Returns ``(index, its path, status)``."""
    options = run.search
    explicit = options.index is not None
    index_path = (Path(options.index) if explicit
                  else default_index_path(run.output.out, ckpt, gallery.root))
    fingerprints = (model_fingerprint(model), gallery.fingerprint)
    sharded = ShardedEncoder(_encoder(model, run, device, "gallery", allow_empty=True),
                             shard_dir(index_path), fingerprints, info,
                             reuse=not options.rebuild_index)
    index, status = open_or_build(model, gallery, index_path, explicit, sharded,
                                  rebuild=options.rebuild_index, is_main=info.is_main)
    sharded.cleanup()
    barrier(info)
    if not info.is_main:  # process 0 saved the merged index
        index = load_index(index_path)
    else:
        log.info("gallery index %s: %s (%d images%s)", status, index_path, len(index),
                 f", {len(index.skipped)} unreadable" if index.skipped else "")
    return index, index_path, status


def open_ivf(model: RetrievalNet, index: GalleryIndex, index_path: Path, run: RunSettings,
             info: DistInfo, log):
    """With ``--index-type ivf``: the IVF index over the gallery's codes, reused or built,
    and what ``search.json`` records of it; ``(None, {})`` for the flat search."""
    options = run.search
    if options.index_type != "ivf":
        return None, {}
    nlist = options.nlist or default_nlist(len(index))
    ivf, status, folder = open_or_build_ivf(
        model.quantizer, index, index_path, nlist, options.nprobe or default_nprobe(nlist),
        info, seed=options.seed)
    if not info.is_main:  # the other processes only helped to build it
        return ivf, {}
    log.info("IVF index %s: %s (nlist %d, nprobe %d)", status, folder, nlist, ivf.nprobe)
    return ivf, {"ivf_index": str(folder), "ivf_status": status, "nlist": ivf.nlist,
                 "nprobe": ivf.nprobe}


def rank_queries(model: RetrievalNet, run: RunSettings, device: torch.device, index: GalleryIndex,
                 gallery, ivf, query_files: list[Path], topk: int,
                 ) -> tuple[list[GridRow], list[str]]:
    """Each readable query's top-``topk`` gallery images (flat scan, or the IVF's lists),
    and the query files that could not be read."""
    which = "faiss-query" if ivf is not None else "query"
    queries, kept = _encoder(model, run, device, which)([str(p) for p in query_files])
    kept_list = kept.cpu().tolist()
    readable = set(kept_list)
    unreadable = [str(p) for i, p in enumerate(query_files) if i not in readable]
    if ivf is None:
        scores, positions = rank(queries, index, topk)
    else:
        scores, positions = search_head_queries(ivf, model.quantizer, queries.cpu(),
                                                min(topk, len(index)))
    identities = index.identities()
    gallery_ids = [index.identity(i) for i in range(len(index))]
    gallery_abs = [str(gallery.root / p) for p in index.paths]
    qpaths = [str(query_files[i]) for i in kept_list]
    qids = [query_files[i].parent.name if query_files[i].parent.name in identities else None
            for i in kept_list]
    return ranked_rows(qpaths, qids, scores, positions, gallery_abs, gallery_ids), unreadable


def write_results(run: RunSettings, result: dict, rows: list[GridRow], topk: int, title: str,
                  unreadable: list[str], log) -> None:
    """``search.json``, ``search.png`` and ``search.html`` under ``--out``, and the log."""
    options = run.search
    json_path, png, page = write_search_outputs(run.output.out, result, rows, topk,
                                                options.grid_rows, HTML_ROWS, title)
    if len(rows) > options.grid_rows:
        log.info("search.png shows the first %d of %d queries (--grid-rows); search.html %d; "
                 "search.json all", options.grid_rows, len(rows), min(len(rows), HTML_ROWS))
    if unreadable:
        log.warning("%d query image(s) could not be read: %s", len(unreadable),
                    ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else ""))
    log.info("search: %d queries against %d gallery images: %s, %s, %s", len(rows),
             result["gallery_size"], json_path, png, page)


def _search_milvus(run: RunSettings, device: torch.device, info: DistInfo, model: RetrievalNet,
                   ckpt: Path, log) -> dict:
    """--search --milvus: the gallery lives in a Milvus collection (one process: the
    database does the scaling)."""
    from .milvus_search import milvus_search

    if info.distributed:
        raise UsageError("--search --milvus runs in one process (Milvus distributes the "
                         "search itself): start it without torchrun")
    folders = _DatasetFolders(run)
    query_files, missing = query_files_of(run, folders, log)
    return milvus_search(run, model, ckpt, folders.train, query_files, missing,
                         _encoder(model, run, device, "gallery", allow_empty=True),
                         _encoder(model, run, device, "query"))


def write_examples(model: RetrievalNet, gallery: Dataset, queries: Dataset, codes: Tensor,
                   run: RunSettings, device: torch.device, stem: str,
                   count: int = EXAMPLE_QUERIES, seed: int = EXAMPLE_SEED) -> Path | None:
    """``<out>/<stem>_examples.png``: the grid of ``count`` test queries drawn at a fixed
    seed, ranked against the evaluated gallery ``codes`` ``(N, M)``."""
    log = get_logger()
    items, query_items = readable_items(gallery), readable_items(queries)
    if items is None or query_items is None or len(items) != codes.shape[0] or not query_items:
        log.warning("no examples grid: gallery files and codes do not line up")
        return None
    pick = torch.randperm(len(query_items), generator=torch.Generator().manual_seed(seed))
    chosen = [query_items[i] for i in sorted(pick[:count].tolist())]
    try:
        tables, kept = _encoder(model, run, device, "query")([p for p, _ in chosen])
    except UsageError as exc:  # the evaluation itself succeeded: only the picture is lost
        log.warning("no examples grid: %s", exc)
        return None
    index = GalleryIndex(Path("."), [p for p, _ in items], codes, "", "")
    topk = run.evaluation.topk or DEFAULT_TOPK
    scores, positions = rank(tables, index, topk)
    kept_list = kept.cpu().tolist()
    rows = ranked_rows([chosen[i][0] for i in kept_list], [chosen[i][1] for i in kept_list],
                       scores, positions, index.paths, [ident for _, ident in items])
    return draw_grid(rows, topk, Path(run.output.out) / f"{stem}_examples.png",
                     f"{stem}: {len(rows)} test queries (seed {seed}), top-{topk}")

"""``--milvus``: the gallery kept in a Milvus collection (:mod:`utils.retrieval.milvus_gallery`).

``--search --milvus URI`` opens the model's collection (``opqn_<checkpoint name>``, or
``--milvus-collection``), adds the gallery folder's images it does not hold yet (``--gallery``;
without it, the collection is searched as it is, or filled from ``--dataset``'s train split
when empty), deletes ``--milvus-delete``'s paths, and ranks the queries there, filtered by
``--where``. ``-e --milvus URI`` writes each evaluated model's gallery into its collection.
Items are keyed by their absolute path, so adding a folder twice stores it once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from torch import Tensor

from models import RetrievalNet
from utils.logger import get_logger
from utils.retrieval.gallery_index import model_fingerprint, scan_gallery
from utils.retrieval.milvus_gallery import MilvusGallery, MilvusModel, collection_name

from .gallery_view import DEFAULT_TOPK, HTML_ROWS, GridRow, Hit, rows_json, write_search_outputs
from .settings import MilvusOptions, RunSettings
from .validation import UsageError

ADD_CHUNK = 20000  # images encoded, then inserted, at a time: an interruption keeps the rest
Encoder = Callable[[list[str]], tuple[Tensor, Tensor]]


def open_gallery(model: RetrievalNet, checkpoint: Path, options: MilvusOptions,
                 rebuild: bool = False) -> MilvusGallery:
    """The collection of ``model`` named by ``options`` (created when absent)."""
    config = model.config
    owner = MilvusModel(model_fingerprint(model), config.method, config.num_books,
                        config.num_words, checkpoint.name)
    name = options.collection or collection_name(checkpoint)
    return MilvusGallery.open(options.uri or "", name, owner, token=options.token or "",
                              timeout=options.timeout, rebuild=rebuild)


def add_missing(gallery: MilvusGallery, items: Sequence[tuple[str, str | None]],
                encode: Encoder | None = None, codes: Tensor | None = None,
                progress: bool = False) -> tuple[int, list[str]]:
    """Add the ``(absolute path, identity)`` items that ``gallery`` lacks; their codes come
    from ``codes`` ``(len(items), M)`` when given, else from ``encode(paths)``.

    Returns ``(items added, paths that could not be read)``.
    """
    stored = gallery.stored_paths()
    missing = [i for i, (path, _) in enumerate(items) if path not in stored]
    if not missing:
        return 0, []
    added, unreadable = 0, []
    with gallery.build():  # incomplete until every chunk is in
        for start in range(0, len(missing), ADD_CHUNK):
            chunk = missing[start:start + ADD_CHUNK]
            paths = [items[i][0] for i in chunk]
            if codes is not None:
                new_codes, kept = codes[chunk], list(range(len(chunk)))
            else:
                assert encode is not None
                new_codes, positions = encode(paths)
                kept = positions.tolist()
            unreadable += sorted(set(paths) - {paths[i] for i in kept})
            added += gallery.add([paths[i] for i in kept],
                                 [items[chunk[i]][1] for i in kept], new_codes,
                                 progress=progress)
    return added, unreadable


def folder_items(root: Path) -> list[tuple[str, str | None]]:
    """``(absolute path, identity folder or None)`` of every image of a gallery folder."""
    files = scan_gallery(root)
    base = files.root.resolve()
    return [(str(base / rel), rel.split("/")[0] if "/" in rel else None) for rel in files.paths]


def delete_paths(gallery: MilvusGallery, entries: Sequence[str]) -> int:
    """Delete by path: an existing file is named by its absolute path, anything else as
    given (the stored path of a file that is gone)."""
    keys = [str(Path(e).resolve()) if Path(e).exists() else e for e in entries]
    stored = gallery.stored_paths()
    absent = [k for k in keys if k not in stored]
    if absent:
        get_logger().warning("--milvus-delete: %d path(s) not in the collection: %s",
                             len(absent), ", ".join(absent[:5]))
    return gallery.delete([k for k in keys if k in stored])


def export_codes(model: RetrievalNet, checkpoint: Path, options: MilvusOptions,
                 items: Sequence[tuple[str, str | None]], codes: Tensor) -> MilvusGallery:
    """-e --milvus: the evaluated gallery's ``items`` and ``codes`` ``(N, M)`` into the model's
    collection (items already there are kept)."""
    gallery = open_gallery(model, checkpoint, options)
    absolute = [(str(Path(path).resolve()), identity) for path, identity in items]
    added, _ = add_missing(gallery, absolute, codes=codes)
    get_logger().info("milvus: %d gallery images added to %s in %s (%d in all)", added,
                      gallery.name, gallery.uri, len(gallery))
    return gallery


def _query_identities(gallery: MilvusGallery, query_files: Sequence[Path]) -> list[str | None]:
    """Each query's folder name where the gallery holds that identity, else None."""
    known: dict[str, bool] = {}
    for name in {p.parent.name for p in query_files}:
        known[name] = gallery.has_identity(name)
    return [p.parent.name if known[p.parent.name] else None for p in query_files]


def milvus_search(run: RunSettings, model: RetrievalNet, checkpoint: Path,
                  default_gallery: Callable[[], Path], query_files: list[Path],
                  missing: list[str], encode_gallery: Encoder,
                  encode_queries: Encoder) -> dict:
    """The ``--search --milvus`` flow; returns what is written to ``search.json``."""
    log = get_logger()
    options, milvus = run.search, run.milvus
    gallery = open_gallery(model, checkpoint, milvus, rebuild=options.rebuild_index)
    folder = Path(options.gallery) if options.gallery else None
    if folder is None and (len(gallery) == 0 or not gallery.complete):
        folder = default_gallery()
    status = "reused"
    if folder is not None:
        added, unreadable = add_missing(gallery, folder_items(folder), encode=encode_gallery,
                                        progress=run.output.progress)
        status = f"added {added}" if added else "up to date"
        if unreadable:
            log.warning("%d gallery image(s) could not be read: %s", len(unreadable),
                        ", ".join(unreadable[:5]))
    deleted = delete_paths(gallery, milvus.delete) if milvus.delete else 0
    size = len(gallery)
    if size == 0:
        raise UsageError(f"--milvus {gallery.uri}: collection {gallery.name} is empty: add "
                         f"images with --gallery DIR")
    log.info("milvus collection %s in %s: %s (%d images%s)", gallery.name, gallery.uri, status,
             size, f", {deleted} deleted" if deleted else "")

    tables, kept = encode_queries([str(p) for p in query_files])
    kept_list = kept.cpu().tolist()
    readable = set(kept_list)
    unreadable_queries = [str(p) for i, p in enumerate(query_files) if i not in readable]
    topk = options.topk or DEFAULT_TOPK
    scores, paths, identities = gallery.search(tables, topk, milvus.where or "")
    kept_files = [query_files[i] for i in kept_list]
    qids = _query_identities(gallery, kept_files)
    rows = []
    for q, (qfile, qid) in enumerate(zip(kept_files, qids)):
        hits = [Hit(path, ident or None, float(score), None if qid is None else ident == qid)
                for path, ident, score in zip(paths[q], identities[q], scores[q].tolist())]
        rows.append(GridRow(str(qfile), qid, hits))
    result = {
        "checkpoint": str(checkpoint),
        "bits": model.config.bits, "num_books": model.config.num_books,
        "num_words": model.config.num_words,
        "gallery": str(folder) if folder is not None else None, "gallery_size": size,
        "index_type": "milvus", "milvus": gallery.uri, "collection": gallery.name,
        "collection_status": status, "deleted": deleted, "where": milvus.where,
        "topk": topk, "score": "sum_m P_m[code_m] (asymmetric, higher is closer)",
        "queries": rows_json(rows),
        "unreadable_queries": unreadable_queries + list(missing),
    }
    gallery.close()
    title = f"{checkpoint.stem}: top-{topk} of {size} images in Milvus"
    json_path, png, page = write_search_outputs(run.output.out, result, rows, topk,
                                                options.grid_rows, HTML_ROWS, title)
    log.info("search: %d queries against %d images in Milvus: %s, %s, %s", len(rows), size,
             json_path, png, page)
    return result

"""--export-faiss: the gallery codes as a faiss index file, with the id list that names them."""
from __future__ import annotations

import csv
from pathlib import Path

from torch import Tensor

from data.datasets import readable_items
from utils.errors import UsageError
from utils.logger import get_logger

from .faiss_index import build_head_index, save_faiss_index
from .ivf_index import build_ivf_index


def export_path(value: str, out_dir: str) -> Path:
    """--export-faiss: a bare file name goes under --out; a path is taken as given."""
    path = Path(value)
    return path if path.parent.parts else Path(out_dir) / path


def export_gallery_index(model, codes: Tensor, gallery, index_path: Path,
                         index_type: str = "flat", nlist: int | None = None,
                         nprobe: int | None = None) -> None:
    """--export-faiss: the faiss index of the gallery codes ``(N, M)`` for the method's score
    (:func:`build_head_index`, or with ``index_type="ivf"``
    :func:`utils.retrieval.ivf_index.build_ivf_index`, ``nprobe`` stored in the file), and
    ``<stem>.ids.csv`` beside it: the image of each faiss id, without which the ids mean
    nothing."""
    paths = readable_items(gallery) or []
    if len(paths) != codes.shape[0]:
        raise RuntimeError(f"{codes.shape[0]} gallery codes but {len(paths)} gallery files: "
                           f"cannot write the id list of {index_path}")
    index_path.parent.mkdir(parents=True, exist_ok=True)
    if index_type == "ivf":
        if nlist is not None and nlist > codes.shape[0]:
            raise UsageError(f"--nlist {nlist} exceeds the {codes.shape[0]} gallery items: "
                             f"give --nlist {codes.shape[0]} or fewer")
        faiss_index = build_ivf_index(model.quantizer, codes.cpu(), nlist, nprobe)
    else:
        faiss_index = build_head_index(model.quantizer, codes.cpu())
    save_faiss_index(faiss_index, index_path)
    ids_path = index_path.with_name(f"{index_path.stem}.ids.csv")
    with open(ids_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "identity"])
        for i, (file, identity) in enumerate(paths):
            writer.writerow([i, file, identity])
    lists = f" (nlist {faiss_index.nlist}, nprobe {faiss_index.nprobe})" \
        if index_type == "ivf" else ""
    get_logger().info("faiss %s%s with %d gallery codes written to %s (ids: %s)",
                      type(faiss_index).__name__, lists, codes.shape[0], index_path, ids_path)

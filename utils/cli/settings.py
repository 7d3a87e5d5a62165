"""What the flows take: the command line as typed groups, built once at the boundary.

``opqn_main.py`` parses and checks its flags (``validation.check_options``), then builds one
:class:`RunSettings`; ``pipeline`` and ``search`` hand each helper the group it reads, so no
argparse ``Namespace`` travels past the entry point. Fields keep the flags' own meaning:
``None`` is "not given, take the dataset's or the method's default".
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any

from models.methods import DEFAULT_METHOD, get_method
# The model and training groups are defined beside their resolution (utils.training.config).
from utils.training.config import ModelSettings, TrainingOptions


@dataclass(frozen=True)
class DataSettings:
    """Where the images come from and how they are read (--dataset, --data-dir, -c, ...)."""

    dataset: str = "facescrub"
    data_dir: str = "./data"
    cross_dataset: bool = False
    cache: bool | None = None  # None: the dataset preset's default
    workers: int | None = None  # None: min(4, CPU count)
    synthface_identities: int | None = None
    synthface_images: int | None = None
    regenerate_synthface: bool = False
    allow_identity_overlap: bool = False
    progress: bool = True

    def loader_workers(self) -> int:
        """--workers, or by default min(4, CPU count)."""
        return self.workers if self.workers is not None else min(4, os.cpu_count() or 1)

    def use_cache(self, preset_cache: bool) -> bool:
        """--cache / --no-cache, or the dataset preset's default ``preset_cache``."""
        return preset_cache if self.cache is None else self.cache


@dataclass(frozen=True)
class OutputSettings:
    """Where a run writes: results, checkpoints and logs, and whether it may replace them."""

    out: str = "results"
    checkpoint_dir: str = "checkpoint"
    log_dir: str = "log"
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class EvaluationOptions:
    """The final evaluation and what -e writes besides its results."""

    topk: int | None = None  # None: the dataset's k
    ties: str = "expected"
    batch_size: int | None = None  # None: 256 (inference only: it does not change the codes)
    export_faiss: tuple[str, ...] = ()
    index_type: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None

    @property
    def inference_batch(self) -> int:
        return self.batch_size or 256


@dataclass(frozen=True)
class SearchOptions:
    """--search: the model, the gallery and queries, the index and the pictures."""

    load: str = ""
    gallery: str | None = None  # None: --dataset's train split
    query: tuple[str, ...] = ()  # empty: --dataset's test split
    index: str | None = None
    rebuild_index: bool = False
    grid_rows: int = 20
    topk: int | None = None
    index_type: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class MilvusOptions:
    """--milvus: the gallery in a Milvus collection (Lite file or server)."""

    uri: str | None = None  # None: no Milvus
    token: str | None = None
    collection: str | None = None  # None: opqn_<checkpoint name>
    timeout: float = 30.0
    where: str | None = None
    delete: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSettings:
    """One command line, grouped; ``device`` is the --device text (resolved by the caller)."""

    data: DataSettings = field(default_factory=DataSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    evaluation: EvaluationOptions = field(default_factory=EvaluationOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    milvus: MilvusOptions = field(default_factory=MilvusOptions)
    device: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunSettings:
        """The settings of a parsed ``opqn_main.py`` command line (flags it lacks take the
        defaults above, so other scripts' parsers work too)."""
        progress = not getattr(args, "no_progress", False)
        given = dict(vars(args), progress=progress)
        method = given.get("method") or DEFAULT_METHOD
        method_fields = {info.name: given.get(info.name, info.default)
                         for info in get_method(method).param_info()}
        batch = given.get("bs")
        return cls(
            data=_group(DataSettings, given),
            output=_group(OutputSettings, given),
            model=_group(ModelSettings, given, method_fields=method_fields,
                         backbone_args=tuple(given.get("backbone_args") or ())),
            training=_group(TrainingOptions, given, batch_size=batch,
                            adam_betas=_pair(given.get("adam_betas"))),
            evaluation=_group(EvaluationOptions, given, batch_size=batch,
                              export_faiss=tuple(given.get("export_faiss") or ())),
            search=_group(SearchOptions, given, load=(given.get("load") or [""])[0],
                          query=tuple(given.get("query") or ())),
            milvus=MilvusOptions(
                uri=given.get("milvus"), token=given.get("milvus_token"),
                collection=given.get("milvus_collection"),
                timeout=given.get("milvus_timeout") or 30.0, where=given.get("where"),
                delete=tuple(given.get("milvus_delete") or ())),
            device=given.get("device") or "auto",
        )


def _group(kind: type, given: dict[str, Any], **overrides: Any):
    """``kind`` filled from the flags of the same name, then ``overrides``; a flag that is
    absent or None keeps the field's default."""
    values = {f.name: given[f.name] for f in fields(kind) if given.get(f.name) is not None}
    return kind(**{**values, **overrides})


def _pair(values) -> tuple[float, float] | None:
    return None if values is None else (float(values[0]), float(values[1]))


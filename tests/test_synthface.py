"""Tests for the built-in procedural face dataset (data/synthface.py).  Tiny configs only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from data.synthface import (  # noqa: E402
    IdentityParams,
    Variation,
    ensure_synthface,
    render_face,
    sample_identity,
    sample_variation,
)

TINY = dict(seed=3, num_identities=4, train_per_identity=3, test_per_identity=2,
            cross_identities=3, image_size=64, progress=False, workers=1)
SPLITS = ("train", "test", "cross_train", "cross_test")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthface(tmp_path_factory.mktemp("sf"), **TINY)


def test_layout_and_counts(tiny: Path) -> None:
    assert tiny.name == "synthface"
    assert sorted(p.name for p in tiny.iterdir()) == sorted(SPLITS + ("synthface.json",))
    expect = {"train": (4, 3, "id"), "test": (4, 2, "id"), "cross_train": (3, 3, "xid"), "cross_test": (3, 2, "xid")}
    for split, (n_ids, per_id, prefix) in expect.items():
        ids = sorted(p.name for p in (tiny / split).iterdir())
        assert ids == [f"{prefix}{i:04d}" for i in range(n_ids)]
        for ident in ids:
            pngs = sorted((tiny / split / ident).glob("*.png"))
            assert len(pngs) == per_id
            with Image.open(pngs[0]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
    # Train and test images of an identity are different files (FaceScrub-style split).
    train_names = {p.name for p in (tiny / "train" / "id0000").glob("*.png")}
    test_names = {p.name for p in (tiny / "test" / "id0000").glob("*.png")}
    assert not train_names & test_names
    meta = json.loads((tiny / "synthface.json").read_text())
    assert meta["num_identities"] == 4 and meta["seed"] == 3 and meta["image_size"] == 64


def test_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = ensure_synthface(tmp_path, **{**TINY, "workers": 2})  # worker count must not matter
    assert _files(again) == _files(tiny)


def test_identity_sets_disjoint(tiny: Path) -> None:
    main = {p.name for p in (tiny / "train").iterdir()} | {p.name for p in (tiny / "test").iterdir()}
    cross = {p.name for p in (tiny / "cross_train").iterdir()} | {p.name for p in (tiny / "cross_test").iterdir()}
    assert main and cross and not main & cross
    # The identity parameters come from different random streams, not just different names.
    from data.synthface import _STREAM_CROSS, _STREAM_MAIN, _identity_rng

    params_main = [sample_identity(_identity_rng(3, _STREAM_MAIN, i)) for i in range(4)]
    params_cross = [sample_identity(_identity_rng(3, _STREAM_CROSS, i)) for i in range(3)]
    assert not set(params_main) & set(params_cross)


def test_second_call_is_noop(tiny: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*")}
    assert ensure_synthface(tiny.parent, **TINY) == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*")} == before


def test_images_of_identity_differ(tiny: Path) -> None:
    arrays = [np.asarray(Image.open(p)) for p in sorted((tiny / "train" / "id0001").glob("*.png"))]
    arrays += [np.asarray(Image.open(p)) for p in sorted((tiny / "test" / "id0001").glob("*.png"))]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert np.abs(arrays[i].astype(int) - arrays[j].astype(int)).mean() > 5


def test_params_change_regenerates(tmp_path: Path) -> None:
    cfg = {**TINY, "num_identities": 2, "cross_identities": 1, "train_per_identity": 1, "test_per_identity": 1}
    root = ensure_synthface(tmp_path, **cfg)
    first = _files(root)
    ensure_synthface(tmp_path, **{**cfg, "seed": 4})
    second = _files(root)
    assert second.keys() == first.keys() and second != first
    assert json.loads((root / "synthface.json").read_text())["seed"] == 4
    ensure_synthface(tmp_path, **{**cfg, "num_identities": 3})
    assert (root / "train" / "id0002").is_dir()
    # Nothing is left behind: no temp or outdated folders beside the dataset.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthface"]


def test_foreign_folder_is_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "synthface" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        ensure_synthface(tmp_path, **TINY)
    assert (tmp_path / "synthface" / "train").is_dir()


def test_render_helpers() -> None:
    rng = np.random.default_rng(0)
    params = sample_identity(rng)
    assert isinstance(params, IdentityParams)
    var = sample_variation(rng)
    assert isinstance(var, Variation)
    img = render_face(params, var, 48)
    assert img.mode == "RGB" and img.size == (48, 48)
    # Same inputs, same pixels; difficulty 0 is a clean canonical view.
    assert render_face(params, var, 48).tobytes() == img.tobytes()
    clean = sample_variation(np.random.default_rng(1), difficulty=0.0)
    assert clean.angle == 0 and clean.glasses == "none" and clean.noise == 0 and clean.clutter == 0

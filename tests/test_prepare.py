"""Tests of the split tool ``data.prepare`` on small generated image folders."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import prepare
from data.prepare import PrepareError, plan_split, plan_from_manifest, read_manifest, write_split

REPO = Path(__file__).resolve().parent.parent


def _img(path: Path, seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB",
         fmt: str | None = None) -> Path:
    """A small random image; ``seed`` fixes its content."""
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def _make_raw(root: Path, counts: dict[str, int], seed0: int = 0) -> Path:
    """``counts[identity]`` distinct PNG images per identity folder."""
    seed = seed0
    for ident, n in counts.items():
        (root / ident).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            _img(root / ident / f"{j:03d}.png", seed, (8 + j % 5, 8))
            seed += 1
    return root


def _messy_raw(root: Path) -> Path:
    """Mixed formats, sizes and modes; a corrupt file, a text file, a duplicate, a small id."""
    a = root / "alice"
    _img(a / "a0.jpg", 1, (40, 30))
    _img(a / "a1.png", 2, (17, 23), "RGBA")
    _img(a / "a2.bmp", 3, (9, 9))
    _img(a / "a3.png", 4, (30, 31), "L")
    _img(a / "a4.JPEG", 5, (64, 20), fmt="JPEG")
    _img(a / "a5.webp", 6, (15, 15))
    _img(a / "a6.tif", 7, (11, 12))
    b = root / "bob"
    for j in range(8):
        _img(b / f"b{j}.png", 100 + j)
    shutil.copyfile(b / "b0.png", b / "b0_copy.png")  # same content, another name
    good = (b / "b1.png").read_bytes()
    (b / "broken.png").write_bytes(good[: len(good) // 2])  # truncated: fails on load()
    (b / "notes.txt").write_text("not an image")
    (b / "nested").mkdir()
    _img(b / "nested" / "deep.png", 999)
    c = root / "carol"
    for j in range(3):
        _img(c / f"c{j}.png", 200 + j)
    return root


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.prepare", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _split_counts(plan: prepare.SplitPlan) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for e in plan.entries:
        counts[(e.identity, e.split)] = counts.get((e.identity, e.split), 0) + 1
    return counts


def test_messy_folder_is_reported_and_cleaned(tmp_path: Path) -> None:
    raw = _messy_raw(tmp_path / "raw")
    plan = plan_split(raw, "facescrub", workers=2)
    rep = plan.report
    assert [p for p, _ in rep.corrupt] == ["bob/broken.png"]
    assert rep.non_image == ["bob/notes.txt"]
    assert ("bob/nested", prepare._NESTED) in rep.ignored
    assert rep.duplicates == [("bob/b0_copy.png", "bob/b0.png")]
    assert rep.skipped_identities == [("carol", 3, 6)]
    assert plan.identities() == ["alice", "bob"]
    # every format and mode of alice made it: 7 images, 5 test + 2 train
    alice = sorted(e.source for e in plan.entries if e.identity == "alice")
    assert alice == ["alice/a0.jpg", "alice/a1.png", "alice/a2.bmp", "alice/a3.png",
                     "alice/a4.JPEG", "alice/a5.webp", "alice/a6.tif"]
    assert _split_counts(plan) == {("alice", "test"): 5, ("alice", "train"): 2,
                                   ("bob", "test"): 5, ("bob", "train"): 3}
    summary = plan.summary()
    assert "identities=2 train_images=5 test_images=10 skipped_identities=1" in summary
    assert "corrupt_files=1 non_image_files=1 duplicates=1" in summary


@pytest.mark.parametrize("protocol,test_n,train_n", [
    ("facescrub", 5, None), ("youtube", 5, 40), ("cfw", 10, None), ("vggface2", 50, None),
])
def test_preset_counts(tmp_path: Path, protocol: str, test_n: int, train_n: int | None) -> None:
    need = test_n + (train_n or 1)
    raw = _make_raw(tmp_path / "raw", {"big": need + 7, "exact": need, "small": need - 1})
    plan = plan_split(raw, protocol, workers=2)
    counts = _split_counts(plan)
    assert counts[("exact", "test")] == test_n
    assert counts[("exact", "train")] == (train_n or 1)
    assert counts[("big", "test")] == test_n
    assert counts[("big", "train")] == (train_n or need + 7 - test_n)
    assert [s[0] for s in plan.report.skipped_identities] == ["small"]
    assert plan.report.unused_images == (7 if train_n else 0)


def test_recursive_reads_sub_folders(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path / "raw", {"p": 2})
    _make_raw(raw / "p", {"video1": 3, "video2": 2}, seed0=50)
    assert len(plan_split(raw, "facescrub", test_per_identity=1).entries) == 2
    plan = plan_split(raw, "facescrub", test_per_identity=1, recursive=True)
    names = sorted(Path(e.path).name for e in plan.entries)
    assert len(names) == 7 and "video1__000.png" in names and "000.png" in names
    write_split(plan, tmp_path / "data" / "ds")
    assert len(list((tmp_path / "data" / "ds").rglob("*.png"))) == 7


def test_explicit_counts_override_preset(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path / "raw", {"x": 9})
    plan = plan_split(raw, "youtube", test_per_identity=2, train_per_identity=3)
    assert _split_counts(plan) == {("x", "test"): 2, ("x", "train"): 3}


def test_same_content_never_in_both_splits(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path / "raw", {"p": 10, "q": 10})
    for j in range(6):  # many copies of one picture inside p, under different names
        shutil.copyfile(raw / "p" / "000.png", raw / "p" / f"zz_copy{j}.png")
    shutil.copyfile(raw / "p" / "001.png", raw / "q" / "from_p.png")  # across identities
    plan = plan_split(raw, "facescrub", test_per_identity=3)
    assert len(plan.report.duplicates) == 6
    assert plan.report.cross_identity_duplicates == [("p/001.png", "q/from_p.png")]
    out = tmp_path / "data" / "ds"
    write_split(plan, out)
    train = set(_tree(out / "train").values())
    test = set(_tree(out / "test").values())
    assert train and test and not train & test
    # the ambiguous picture is in neither identity
    shared = hashlib.sha256((raw / "p" / "001.png").read_bytes()).hexdigest()
    assert shared not in train | test
    assert len(train) + len(test) == len(plan.entries)  # no duplicate content at all


def test_cross_protocol_excludes_listed_identities(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path / "raw", {"Alice_Smith": 52, "bob": 52, "carl": 52})
    listing = tmp_path / "targets.txt"
    listing.write_text("# target identities\nalice smith\nnobody\n")
    data = tmp_path / "data"
    res = _run(raw, "--name", "vgg", "--data-dir", data, "--protocol", "cross",
               "--exclude-identities", listing)
    assert res.returncode == 0, res.stderr
    out = data / "vgg"
    assert sorted(os.listdir(out / "cross_train")) == ["bob", "carl"]
    assert sorted(os.listdir(out / "cross_test")) == ["bob", "carl"]
    assert len(os.listdir(out / "cross_test" / "bob")) == 50
    assert (out / "cross_manifest.csv").is_file() and not (out / "train").exists()
    assert "excluded_identities=1" in res.stdout
    # a folder works too: its sub-folder names are the identities to leave out
    target = _make_raw(tmp_path / "target_train", {"carl": 1, "bob": 1})
    plan = plan_split(raw, "cross", exclude_identities=target)
    assert plan.identities() == ["Alice_Smith"]
    assert plan.split_names == ("cross_train", "cross_test")


def test_cross_needs_exclusions(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path / "raw", {"a": 60})
    res = _run(raw, "--name", "x", "--data-dir", tmp_path / "data", "--protocol", "cross")
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and res.stderr.count("\n") == 1


def test_manifest_round_trip(tmp_path: Path) -> None:
    raw = _messy_raw(tmp_path / "raw")
    first, second = tmp_path / "d1", tmp_path / "d2"
    assert _run(raw, "--name", "ds", "--data-dir", first, "--seed", "7").returncode == 0
    manifest = first / "ds" / "manifest.csv"
    rows = read_manifest(manifest)
    assert {r.split for r in rows} == {"train", "test"}
    assert all(r.path == f"{r.split}/{r.identity}/{Path(r.source).name}" for r in rows)
    res = _run(raw, "--name", "ds", "--data-dir", second, "--from-manifest", manifest)
    assert res.returncode == 0, res.stderr
    assert (second / "ds" / "manifest.csv").read_bytes() == manifest.read_bytes()
    for split in ("train", "test"):
        assert _tree(second / "ds" / split) == _tree(first / "ds" / split)
    # a changed source file is caught by its hash
    _img(raw / "alice" / "a2.bmp", 12345, (9, 9))
    res = _run(raw, "--name", "ds", "--data-dir", tmp_path / "d3", "--from-manifest", manifest)
    assert res.returncode == 2 and "different content" in res.stderr
    assert not (tmp_path / "d3").exists()


def test_manifest_rejects_unsafe_paths(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("path,identity,split,sha256,source\n"
                   f"train/a/x.png,a,train,{'0' * 64},../outside.png\n")
    with pytest.raises(PrepareError, match="source"):
        read_manifest(bad)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path / "raw", {f"id{i}": 12 for i in range(4)})
    a = plan_split(raw, "facescrub", seed=3).entries
    b = plan_split(raw, "facescrub", seed=3).entries
    c = plan_split(raw, "facescrub", seed=4).entries
    assert a == b
    assert a != c
    # adding an identity leaves the others' split unchanged
    _make_raw(raw, {"new": 12}, seed0=500)
    d = plan_split(raw, "facescrub", seed=3).entries
    assert [e for e in d if e.identity != "new"] == a


@pytest.mark.parametrize("case", ["missing", "empty", "too_many", "exists", "bad_n", "bad_list"])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, case: str) -> None:
    raw = tmp_path / "raw"
    data = tmp_path / "data"
    args: list[str | Path] = [raw, "--name", "ds", "--data-dir", data]
    if case == "empty":
        raw.mkdir()
        (raw / "someone").mkdir()
    elif case in ("too_many", "exists", "bad_n", "bad_list"):
        _make_raw(raw, {"a": 8, "b": 9})
    if case == "too_many":
        args += ["--test-per-identity", "9"]
    if case == "bad_n":
        args += ["--test-per-identity", "0"]
    if case == "bad_list":
        args += ["--protocol", "cross", "--exclude-identities", tmp_path / "nope.txt"]
    if case == "exists":
        assert _run(*args).returncode == 0
    before = _tree(tmp_path)
    res = _run(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert _tree(tmp_path) == before
    if case != "exists":
        assert not data.exists()
    if case == "exists":
        assert _run(*args, "--force", "--seed", "1").returncode == 0
        assert not [p for p in data.iterdir() if p.name.startswith(".")]


def test_link_and_copy(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path / "raw", {"a": 7})
    assert _run(raw, "--name", "l", "--data-dir", tmp_path / "d").returncode == 0
    assert _run(raw, "--name", "c", "--data-dir", tmp_path / "d", "--copy").returncode == 0
    src = raw / "a" / "000.png"
    linked = next((tmp_path / "d" / "l").rglob("000.png"))
    copied = next((tmp_path / "d" / "c").rglob("000.png"))
    assert os.path.samefile(src, linked)  # hard link (or symlink) on this filesystem
    assert not os.path.samefile(src, copied) and copied.read_bytes() == src.read_bytes()


def test_crash_while_writing_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    raw = _make_raw(tmp_path / "raw", {"a": 8, "b": 8})
    plan = plan_split(raw, "facescrub")
    calls = {"n": 0}
    real = prepare._Placer.place

    def flaky(self, src, dst):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(self, src, dst)

    monkeypatch.setattr(prepare._Placer, "place", flaky)
    with pytest.raises(OSError):
        write_split(plan, tmp_path / "data" / "ds")
    assert list((tmp_path / "data").iterdir()) == []


def test_plan_from_manifest_api(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path / "raw", {"a": 8, "b": 8})
    plan = plan_split(raw, "facescrub", seed=2)
    write_split(plan, tmp_path / "data" / "ds")
    again = plan_from_manifest(raw, tmp_path / "data" / "ds" / "manifest.csv")
    assert again.entries == plan.entries

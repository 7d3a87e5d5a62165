"""The protocol of docs/paper.md ("Training protocol", "Evaluation protocol"): presets, transforms, top-k, and the PR curve against brute force."""
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from data.datasets import CROSS_PRESET, MONITOR_TOP_K, PRESETS, dataset_preset
from data.transforms import ResizeCenterSquare, build_transform, normalization
from utils.retrieval.adc import evaluate_adc
from utils.training.loop import TrainSettings


@pytest.mark.parametrize("name", ["facescrub", "youtube", "cfw"])
def test_small_dataset_presets(name):
    p = PRESETS[name]
    assert (p.input_size, p.epochs, p.lr_step, p.scale, p.top_k, p.width, p.batch_size) == \
        (32, 200, 35, 20.0, 5, 64, 256)


def test_vggface2_and_cross_presets():
    p = PRESETS["vggface2"]
    assert (p.input_size, p.epochs, p.lr_step, p.scale, p.top_k, p.width, p.batch_size) == \
        (112, 160, 20, 40.0, 10, 64, 256)
    assert dataset_preset("facescrub", cross=True) == CROSS_PRESET == p
    assert MONITOR_TOP_K == 50
    # Any 112x112 run uses s = 40, also the built-in dataset's cross-dataset run.
    cross_synth = dataset_preset("synthface", cross=True)
    assert (cross_synth.input_size, cross_synth.scale) == (112, 40.0)
    assert dataset_preset("some_folder").scale == 20.0


def test_optimiser_defaults():
    s = TrainSettings(epochs=1)
    assert (s.lr, s.lr_decay, s.momentum, s.weight_decay, s.batch_size) == \
        (0.1, 0.5, 0.9, 5e-4, 256)


def test_cli_defaults():
    from opqn_main import build_parser

    from models.methods import get_method

    args = build_parser().parse_args([])
    assert (args.margin, args.miu) == (0.5, 0.1)
    # --lr defaults to the method's own value: the paper's 0.1 with SGD for OPQN.
    assert args.lr is None and args.method in (None, "opqn")
    assert get_method("opqn").optimizer_for(32) == get_method("opqn").optimizer_for(112) == "sgd"
    assert get_method("opqn").default_lr("sgd") == 0.1


def _steps(transform) -> list:
    return list(transform.transforms)


@pytest.mark.parametrize("size,stored,mean,std", [
    (32, 35, (0.639, 0.479, 0.404), (0.216, 0.183, 0.171)),
    (112, 120, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_transforms(size, stored, mean, std):
    assert normalization(size) == (mean, std)
    for train in (True, False):
        steps = _steps(build_transform(size, train=train))
        kinds = [type(s) for s in steps]
        middle = [v2.RandomCrop, v2.RandomHorizontalFlip] if train else [v2.CenterCrop]
        assert kinds == [ResizeCenterSquare, v2.ToImage, *middle, v2.ToDtype, v2.Normalize]
        assert steps[0].size == stored  # the shorter side goes to `stored`
        assert list(steps[2].size) == [size, size]
        if train:
            assert steps[3].p == 0.5
        assert tuple(steps[-1].mean) == mean and tuple(steps[-1].std) == std
        cached = [type(s) for s in _steps(build_transform(size, train=train, resized=True))]
        assert cached == [v2.ToImage, *middle, v2.ToDtype, v2.Normalize]


def _brute_force_pr(tables, codes, q_labels, db_labels, cutoffs, ties):
    """Mean precision and recall at each cut-off, item by item, in float64.

    ``stable``: ties broken by database index. ``expected``: an item of a tie group of
    ``t`` items with ``a`` items strictly above it is in the top ``c`` with probability
    ``clamp((c - a) / t, 0, 1)`` under a uniformly random order of the group.
    """
    n = codes.shape[0]
    precision = torch.zeros(len(cutoffs), dtype=torch.float64)
    recall = torch.zeros(len(cutoffs), dtype=torch.float64)
    count = 0
    for qi in range(tables.shape[0]):
        scores = [sum(float(tables[qi, m, int(codes[i, m])]) for m in range(codes.shape[1]))
                  for i in range(n)]
        rel = [int(db_labels[i]) == int(q_labels[qi]) for i in range(n)]
        nrel = sum(rel)
        if nrel == 0:
            continue
        count += 1
        for ci, c in enumerate(cutoffs):
            if ties == "stable":
                order = sorted(range(n), key=lambda i: (-scores[i], i))
                hits = sum(rel[i] for i in order[:c])
            else:
                hits = 0.0
                for i in range(n):
                    above = sum(s > scores[i] for s in scores)
                    tied = sum(s == scores[i] for s in scores)
                    hits += rel[i] * min(max((c - above) / tied, 0.0), 1.0)
            precision[ci] += hits / c
            recall[ci] += hits / nrel
    return precision / count, recall / count


@pytest.mark.parametrize("ties", ["stable", "expected"])
def test_pr_curve_matches_brute_force(ties):
    g = torch.Generator().manual_seed(7)
    m, k, n, q = 2, 4, 40, 5
    # Few distinct codes, so many items tie; distinct codes have distinct scores.
    distinct = torch.randint(0, k, (6, m), generator=g)
    codes = distinct[torch.randint(0, 6, (n,), generator=g)].to(torch.uint8)
    tables = torch.softmax(2 * torch.randn(q, m, k, generator=g), -1)
    db_labels = torch.randint(0, 3, (n,), generator=g)
    q_labels = torch.tensor([0, 1, 2, 1, 7])  # label 7 has no relevant item: left out
    res = evaluate_adc(tables, codes, q_labels, db_labels, k=5, ties=ties, pr_points=12)
    cutoffs = res["pr_curve"]["cutoffs"]
    assert cutoffs[0] == 1 and cutoffs[-1] == n and len(cutoffs) > 5
    precision, recall = _brute_force_pr(tables, codes, q_labels, db_labels, cutoffs, ties)
    torch.testing.assert_close(torch.tensor(res["pr_curve"]["precision"], dtype=torch.float64),
                               precision, rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.tensor(res["pr_curve"]["recall"], dtype=torch.float64),
                               recall, rtol=0, atol=1e-9)
    p5, r5 = _brute_force_pr(tables, codes, q_labels, db_labels, [5], ties)
    assert res["precision_at_k"] == pytest.approx(p5.item(), abs=1e-9)
    assert res["recall_at_k"] == pytest.approx(r5.item(), abs=1e-9)
    assert res["skipped_queries"] == 1


@pytest.mark.parametrize("size", [32, 112])
def test_cache_and_files_give_equal_tensors_for_non_square_images(tmp_path, size):
    import numpy as np
    from PIL import Image

    from data.cache import CachedImageDataset, open_cache
    from data.datasets import FaceFolder

    rng = np.random.default_rng(0)
    for identity, (w, h) in enumerate([(50, 30), (27, 61), (40, 40)]):
        folder = tmp_path / "train" / f"id{identity}"
        folder.mkdir(parents=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "a.png")
    split = tmp_path / "train"
    cache = open_cache(split, 35 if size == 32 else 120, progress=False)
    for train in (False, True):
        files = FaceFolder(split, build_transform(size, train=train))
        cached = CachedImageDataset(cache, build_transform(size, train=train, resized=True))
        assert len(files) == len(cached) == 3
        for i in range(3):
            torch.manual_seed(i)  # the same random crop and flip on both paths
            from_file, label_f = files[i]
            torch.manual_seed(i)
            from_cache, label_c = cached[i]
            assert from_file.shape == (3, size, size) and label_f == label_c
            assert torch.equal(from_file, from_cache), (train, i)


def test_folder_scanning_is_sorted_and_the_same_for_files_and_cache(tmp_path):
    from data.cache import scan_split
    from data.datasets import find_images

    # Nested folders created in an order that is not sorted; hidden entries are left out.
    for rel in ("b/z/2.png", "b/a.jpg", "b/y/1.PNG", "a/c/x.bmp", "a/b.png", "b/.hidden.png",
                ".trash/a.png", "a/notes.txt"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    expected = ["a/b.png", "a/c/x.bmp", "b/a.jpg", "b/y/1.PNG", "b/z/2.png"]
    classes, samples = find_images(tmp_path)
    assert classes == ["a", "b"]
    assert [str(p.relative_to(tmp_path).as_posix()) for p in map(Path, (s for s, _ in samples))] \
        == expected
    assert [name for _, name in samples] == ["a", "a", "b", "b", "b"]
    cache_classes, files = scan_split(tmp_path)
    assert cache_classes == classes and [f[0] for f in files] == expected
    assert [f[1] for f in files] == [0, 0, 1, 1, 1]


def test_undefined_metrics_are_null_with_the_reason_in_the_json(tmp_path):
    import json

    from utils.cli.reporting import summary_line, write_result

    tables = torch.softmax(torch.randn(3, 2, 4), -1)
    codes = torch.randint(0, 4, (10, 2), dtype=torch.uint8)
    res = evaluate_adc(tables, codes, torch.full((3,), 9), torch.zeros(10, dtype=torch.long))
    res.update({"bits": 4, "num_books": 2, "num_words": 4, "encode_seconds": 0.0,
                "search_seconds": 0.0, "dataset": "x"})
    json_path, _png = write_result(res, tmp_path, "none")
    saved = json.loads(json_path.read_text())
    assert saved["mAP"] is None and saved["precision_at_k"] is None
    assert "no query has a relevant database item" in saved["undefined_reason"]
    assert "mAP undefined" in summary_line(res)


def test_checkpoints_with_the_old_criterion_key_still_load():
    from models.methods import OPQNLoss
    from utils.training.loop import CRITERION_KEY, criterion_state

    state = OPQNLoss(3, 2, 4).state_dict()
    assert CRITERION_KEY == "criterion"
    assert criterion_state({"criterion": state}) is state
    assert criterion_state({"class_weights": state}) is state  # before the rename
    assert criterion_state({"backbone": {}}) is None
    OPQNLoss(3, 2, 4).load_state_dict(criterion_state({"class_weights": state}))


def test_evaluate_adc_edge_cases():
    from utils.retrieval.metrics import pr_cutoffs

    tables = torch.softmax(torch.randn(2, 2, 4), -1)
    one = evaluate_adc(tables, torch.zeros(1, 2, dtype=torch.uint8), torch.tensor([0, 1]),
                       torch.tensor([0]), k=5)
    assert one["mAP"] == 1.0 and one["num_database"] == 1 and one["skipped_queries"] == 1
    with pytest.raises(ValueError, match="the database is empty"):
        evaluate_adc(tables, torch.zeros(0, 2, dtype=torch.uint8), torch.tensor([0, 1]),
                     torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="ties must be one of"):
        evaluate_adc(tables, torch.zeros(3, 2, dtype=torch.uint8), torch.tensor([0, 1]),
                     torch.zeros(3, dtype=torch.long), ties="random")
    codes = torch.randint(0, 4, (1000, 2), dtype=torch.uint8)
    res = evaluate_adc(tables, codes, torch.tensor([0, 1]), torch.randint(0, 3, (1000,)))
    assert res["pr_curve"]["cutoffs"] == pr_cutoffs(1000, 100).tolist()  # 100 points default

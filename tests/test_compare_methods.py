"""The comparison protocol (issue 18): lr chosen on a held-out validation split, seeds,
paired differences, the did-not-train flag, resumable run records, and the tool itself."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from data.validation_split import (ValidationSplitError, build_validation_split,
                                   check_validation_split)
from utils.errors import EXIT_DIVERGED
from utils.comparison.plan import (ComparisonPlan, MethodPlan, RunKey, RunStore, StaleRun,
                              choose_lr, equal_grids, lr_grid, mean_sd, paired_difference, run_comparison,
                              summarise, training_failures)
from models.methods import get_method, method_names

METHODS = method_names()


def _load_tool():
    from utils.comparison import tool

    return tool


# ---------------------------------------------------------------- selection and statistics


@pytest.mark.parametrize("method", ["opqn", "dpq", "gpq", "dcdh"])
def test_lr_grid_is_the_optimisers_grid_plus_the_authors_default(method):
    optimizer = get_method(method).optimizer_for(32)
    sgd, adam = [0.3, 0.03], [7e-4]
    grid = lr_grid(method, optimizer, sgd, adam)
    assert set(grid) == set(sgd if optimizer == "sgd" else adam) | \
        {get_method(method).default_lr(optimizer), get_method(method).authors_lr(optimizer)}
    assert list(grid) == sorted(grid, reverse=True) and len(set(grid)) == len(grid)
    # The default already in the grid is not added twice.
    own = {get_method(method).default_lr(optimizer), get_method(method).authors_lr(optimizer)}
    assert len(lr_grid(method, optimizer, [get_method(method).default_lr(optimizer)],
                       [get_method(method).default_lr(optimizer)])) == len(own)
    if method == "dpq":  # our default (chosen on validation) and the authors' 0.01
        assert own == {0.1, 0.01}


def test_every_method_gets_the_same_number_of_learning_rates():
    """The default grids gave SGD methods 5 rates, GPQ 3 and DCDH 4: unequal tuning."""
    methods = [(m, get_method(m).optimizer_for(32)) for m in ("opqn", "l2q", "dpq", "gpq", "dcdh")]
    for sgd, adam in (([0.3, 0.1, 0.03, 0.01, 0.003], [2e-3, 5e-4, 2e-4]),
                      ([0.1, 0.03], [2e-3, 5e-4]), ([0.1], [1e-3])):
        grids = equal_grids(methods, sgd, adam)
        sizes = {len(g) for g in grids.values()}
        assert len(sizes) == 1, grids
        for m, optimizer in methods:
            own = lr_grid(m, optimizer, sgd, adam)
            assert set(own) <= set(grids[m])  # extended, never cut
            assert len(set(grids[m])) == len(grids[m])
    # GPQ's three Adam rates plus one below and one above, a grid step apart.
    gpq = equal_grids(methods, [0.3, 0.1, 0.03, 0.01, 0.003], [2e-3, 5e-4, 2e-4])["gpq"]
    assert gpq == pytest.approx((6.32e-3, 2e-3, 5e-4, 2e-4, 6.32e-5))


def test_the_verdict_follows_the_95_percent_interval():
    better = paired_difference({0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.70, 1: 0.71, 2: 0.72})
    assert better["verdict"] == "better" and better["ci"][0] > 0
    half = 4.302652729911275 * better["sd"] / math.sqrt(3)  # t(0.975, 2 d.o.f.)
    assert better["ci"] == pytest.approx([better["mean"] - half, better["mean"] + half])
    worse = paired_difference({0: 0.70, 1: 0.71, 2: 0.72}, {0: 0.80, 1: 0.82, 2: 0.81})
    assert worse["verdict"] == "worse" and worse["ci"][1] < 0
    mixed = paired_difference({0: 0.80, 1: 0.70, 2: 0.75}, {0: 0.72, 1: 0.76, 2: 0.74})
    assert mixed["verdict"] == "no detectable difference"
    assert mixed["ci"][0] < 0 < mixed["ci"][1]
    one = paired_difference({0: 0.9}, {0: 0.1})
    assert one["ci"] is None and one["verdict"] == "no detectable difference"


def test_choose_lr_is_the_argmax_of_validation_map():
    grid = [{"lr": 0.1, "val_mAP": 0.4}, {"lr": 0.03, "val_mAP": 0.7},
            {"lr": 0.3, "val_mAP": None}, {"lr": 0.01, "val_mAP": 0.5}]
    assert choose_lr(grid, 0.1) == 0.03
    # A tie goes to the default, else to the smallest lr.
    tied = [{"lr": 0.1, "val_mAP": 0.2}, {"lr": 0.01, "val_mAP": 0.2},
            {"lr": 0.03, "val_mAP": 0.2}]
    assert choose_lr(tied, 0.03) == 0.03 and choose_lr(tied, 0.3) == 0.01
    assert choose_lr([{"lr": 0.1, "val_mAP": None}], 0.1) is None


def test_mean_sd_is_the_sample_sd_and_skips_missing_values():
    values = [0.61, 0.64, 0.70]
    assert mean_sd(values) == pytest.approx((statistics.fmean(values),
                                             statistics.stdev(values)))
    assert mean_sd([0.5, None]) == (0.5, None)
    assert mean_sd([]) == (None, None)


def test_paired_difference_is_taken_seed_by_seed():
    ref = {0: 0.8, 1: 0.7, 2: 0.9}
    other = {0: 0.5, 1: 0.6, 2: None, 3: 0.1}
    diff = paired_difference(ref, other)
    assert diff["seeds"] == [0, 1]
    assert diff["values"] == pytest.approx([0.3, 0.1])
    assert diff["mean"] == pytest.approx(0.2)
    assert diff["sd"] == pytest.approx(statistics.stdev([0.3, 0.1]))


def _history(losses, **parts):
    return [{"epoch": i + 1, "loss": loss, **{k: v[i] for k, v in parts.items()}}
            for i, loss in enumerate(losses)]


def test_training_failures_flag_a_flat_loss_and_a_cross_entropy_at_chance():
    classes = 50
    chance = math.log(classes)
    plain = {"ce_x": chance}
    good = _history([9.0, 5.0, 2.0], ce_x=[8.0, 4.0, 1.0], entropy=[4.0, 4.0, 4.0])
    assert training_failures(good, plain) == []
    flat = _history([9.0, 8.9, 8.8], ce_x=[8.0, 3.0, 1.0])
    assert len(training_failures(flat, plain)) == 1
    assert "loss fell" in training_failures(flat, plain)[0]
    assert training_failures(flat, plain, min_loss_drop=0.02) == []
    dpq = {"ce_soft": chance, "ce_hard": chance}
    at_chance = _history([9.0, 6.0, 4.5], ce_soft=[chance, chance, chance * 0.95],
                         ce_hard=[chance, chance, chance * 0.97])
    reasons = training_failures(at_chance, dpq)
    assert len(reasons) == 1 and "ce_soft" in reasons[0] and "chance level" in reasons[0]
    assert training_failures(at_chance, dpq, ce_margin=0.01) == []
    # DCDH's "class" is a cross-entropy too.
    assert len(training_failures(_history([3.0, 2.0], **{"class": [chance] * 2}),
                                 {"class": chance})) == 1
    assert training_failures(_history([3.0, 2.0], **{"class": [1.0] * 2}),
                             {"class": chance}) == []
    # Without chance levels nobody can tell: flagged, never waved through.
    assert "no chance level" in training_failures(good, None)[0]


def test_a_centre_term_that_falls_does_not_hide_a_cross_entropy_at_chance():
    """DPQ in its authors' form: the centre term falls, the CE stays near log C; the old
    check took every part starting with "ce" (also "center") and its minimum."""
    chance = math.log(10)
    history = _history([280.0, 40.0, 8.0], ce_soft=[chance] * 3, ce_hard=[chance] * 3,
                       center=[269.0, 30.0, 0.5])
    reasons = training_failures(history, {"ce_soft": chance, "ce_hard": chance})
    assert len(reasons) == 1 and "ce_soft" in reasons[0]


def test_a_half_trained_margin_model_is_not_at_chance():
    """OPQN's CosFace CE of a model that knows nothing is s·m + log(C − 1 + e^(−s·m)),
    about 12.2 nats at C = 10, s = 20, m = 0.5: 6 nats there is half trained, not chance,
    although it is far above log C."""
    from models.methods import chance_levels
    from models import NetConfig

    config = NetConfig(num_books=4, num_words=64, feature_dim=64, num_classes=10)
    levels = chance_levels(config)
    assert levels["ce_x"] == pytest.approx(10 + math.log(9 + math.exp(-10)))
    half = _history([13.0, 9.0, 6.5], ce_x=[12.0, 8.0, 6.0], ce_s=[12.1, 8.2, 6.1])
    assert training_failures(half, levels) == []
    stuck = _history([13.0, 12.5, 12.3], ce_x=[12.2, 12.1, 12.0], ce_s=[12.2, 12.1, 12.1])
    assert any("chance level" in r for r in training_failures(stuck, levels, 0.01))
    # DCDH's and DPQ's plain cross-entropies sit at log C.
    for method, parts in (("dcdh", {"class"}), ("dpq", {"ce_soft", "ce_hard"}),
                          ("gpq", {"ce"})):
        levels = chance_levels(NetConfig(num_books=4, num_words=64, feature_dim=24,
                                          num_classes=10, method=method))
        assert set(levels) == parts and all(v == pytest.approx(math.log(10))
                                            for v in levels.values())


def test_a_one_epoch_run_is_tested_against_its_first_step():
    chance = {"ce_x": 12.2}
    stuck = [{"epoch": 1, "loss": 13.6, "first_step_loss": 13.7, "ce_x": 11.0}]
    assert any("from its first step" in r for r in training_failures(stuck, chance))
    fell = [{"epoch": 1, "loss": 9.0, "first_step_loss": 13.7, "ce_x": 7.0}]
    assert training_failures(fell, chance) == []


# ---------------------------------------------------------------- run records and resuming


SETTINGS = {"dataset": "synthface", "flags": ["--amp", "off"], "bits": 12}


def test_run_store_reuses_a_record_and_refuses_one_made_with_other_settings(tmp_path):
    store = RunStore(tmp_path)
    key = RunKey("tune", "opqn", 0.1, 0, 2)
    assert store.get(key, SETTINGS) is None
    store.put(key, SETTINGS, {"status": "done", "mAP": 0.5})
    assert store.get(key, dict(SETTINGS))["outcome"]["mAP"] == 0.5
    with pytest.raises(StaleRun, match=r"settings\.flags.*never replaced silently"):
        store.get(key, {**SETTINGS, "flags": ["--amp", "bf16"]})
    with pytest.raises(StaleRun, match="settings.extra"):
        store.get(key, {**SETTINGS, "extra": 1})
    assert json.loads(store.path(key).read_text())["outcome"]["mAP"] == 0.5  # not replaced


BEST_LR = {"opqn": 0.03, "dpq": 0.01, "dcdh": 5e-4}
FLAT = {"dpq"}  # a fake method whose loss never falls


def _plan(methods=("opqn", "dpq", "dcdh"), seeds=3):
    plans = []
    for m in methods:
        optimizer = get_method(m).optimizer_for(32)
        plans.append(MethodPlan(m, optimizer, get_method(m).default_lr(optimizer),
                                lr_grid(m, optimizer, [0.3, 0.1, 0.03, 0.01], [2e-3, 5e-4])))
    return ComparisonPlan(plans, list(range(seeds)), epochs=4, tune_epochs=3,
                          settings=SETTINGS)


class FakeRunner:
    """Validation mAP peaks at BEST_LR; test mAP depends on method and seed; a run at
    lr 0.3 diverges. Counts its calls and can be told to be interrupted."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[RunKey] = []
        self.interrupt_at = interrupt_at

    def __call__(self, key: RunKey, method: MethodPlan) -> dict:
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(key)
        if key.lr == 0.3:
            return {"status": "diverged", "error": "training loss became nan", "history": []}
        distance = abs(math.log10(key.lr) - math.log10(BEST_LR[key.method]))
        losses = [5.0] * key.epochs if key.method in FLAT else \
            [5.0 / (e + 1) for e in range(key.epochs)]
        score = 0.9 - 0.1 * distance if key.phase == "tune" else \
            {"opqn": 0.8, "dpq": 0.3, "dcdh": 0.7}[key.method] + 0.02 * key.seed ** 2
        curve = {"precision": [score, score / 2], "recall": [0.5, 1.0], "cutoffs": [5, 10]}
        return {"status": "done", "mAP": score, "precision_at_k": score - 0.05, "k": 5,
                "history": _history(losses, ce_x=[loss / 2 for loss in losses]),
                "num_classes": 10, "ce_chance": {"ce_x": 12.2}, "wall_seconds": 1.0,
                "precision": "float32", "bits": 12, "num_books": 2, "num_words": 64,
                "pr_curve": curve, "train_seconds_per_epoch": 0.5}


def test_comparison_chooses_by_validation_and_aggregates_the_seeds(tmp_path):
    lines = []
    plan = _plan()
    runner = FakeRunner()
    summary = run_comparison(plan, RunStore(tmp_path), runner, say=lines.append)
    assert len(runner.calls) == plan.total_runs
    assert lines[-1].startswith(f"[compare] runs {plan.total_runs}/{plan.total_runs}:")
    methods = summary["methods"]
    for m, entry in methods.items():
        scored = [g for g in entry["lr_grid"] if g["val_mAP"] is not None]
        assert entry["chosen_lr"] == max(scored, key=lambda g: g["val_mAP"])["lr"]
        assert entry["chosen_lr"] == BEST_LR[m]
        assert [g["status"] for g in entry["lr_grid"] if g["lr"] == 0.3] in ([], ["diverged"])
        assert entry["seeds"] == plan.seeds
        assert entry["mean_mAP"] == pytest.approx(statistics.fmean(entry["test_mAP"]))
        assert entry["sd_mAP"] == pytest.approx(statistics.stdev(entry["test_mAP"]))
        finals = [k for k in runner.calls if k.phase == "final" and k.method == m]
        assert {k.lr for k in finals} == {entry["chosen_lr"]} and \
            all(k.epochs == plan.epochs for k in finals)
    # dpq's loss never fell: it did not train and is not ranked.
    assert not methods["dpq"]["trained"] and methods["dpq"]["rank"] is None
    assert set(methods["dpq"]["did_not_train"]) == {"0", "1", "2"}
    assert (methods["opqn"]["rank"], methods["dcdh"]["rank"]) == (1, 2)
    diff = methods["dcdh"]["paired_difference"]["mAP"]
    assert diff["values"] == pytest.approx([a - b for a, b in zip(
        methods["opqn"]["test_mAP"], methods["dcdh"]["test_mAP"])])
    assert diff["sd"] == pytest.approx(statistics.stdev(diff["values"]))
    assert "paired_difference" not in methods["opqn"]


def test_an_interrupted_comparison_continues_and_reuses_the_finished_runs(tmp_path):
    plan = _plan()
    first = FakeRunner(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(plan, RunStore(tmp_path), first, say=lambda _line: None)
    assert len(list(tmp_path.glob("*.json"))) == 5  # each finished run was recorded
    lines = []
    second = FakeRunner()
    resumed = run_comparison(plan, RunStore(tmp_path), second, say=lines.append)
    assert len(second.calls) == plan.total_runs - 5
    assert not set(first.calls) & set(second.calls)
    assert sum("reused" in line for line in lines) == 5
    uninterrupted = run_comparison(plan, RunStore(tmp_path / "fresh"), FakeRunner(),
                                   say=lambda _line: None)
    assert resumed["methods"] == uninterrupted["methods"]
    third = FakeRunner()
    run_comparison(plan, RunStore(tmp_path), third, say=lambda _line: None)
    assert third.calls == []  # everything reused
    # More seeds later: only the new seed's runs are trained.
    fourth = FakeRunner()
    run_comparison(_plan(seeds=4), RunStore(tmp_path), fourth, say=lambda _line: None)
    assert {(k.phase, k.seed) for k in fourth.calls} == {("final", 3)}
    plan.settings = {**SETTINGS, "bits": 16}
    with pytest.raises(StaleRun):
        run_comparison(plan, RunStore(tmp_path), FakeRunner(), say=lambda _line: None)


def test_a_method_whose_grid_all_diverged_gets_no_final_runs(tmp_path):
    plan = _plan(methods=("opqn",), seeds=2)
    plan.methods = [MethodPlan("opqn", "sgd", 0.3, (0.3,))]
    lines = []
    summary = run_comparison(plan, RunStore(tmp_path), FakeRunner(), say=lines.append)
    entry = summary["methods"]["opqn"]
    assert entry["chosen_lr"] is None and entry["seeds"] == [] and not entry["trained"]
    assert entry["mean_mAP"] is None and entry["rank"] is None
    assert "2 runs dropped, 1 in all now" in lines[-1]
    assert summarise(plan, summary["runs"])["methods"] == summary["methods"]


# ---------------------------------------------------------------- the validation split


def test_validation_split_holds_out_training_images_without_copying(tiny_data_dir, tmp_path):
    train, test = tiny_data_dir / "synthface" / "train", tiny_data_dir / "synthface" / "test"
    meta = tiny_data_dir / "synthface" / "synthface.json"
    split = build_validation_split(train, (test,), tmp_path / "val", "synthface", False, 2,
                                   extra_files=(meta,))
    assert split.info["identities"] == 6
    assert (split.info["gallery_images"], split.info["query_images"]) == (6 * 4, 6 * 2)
    files = [p for p in (tmp_path / "val").rglob("*.png")]
    assert len(files) == 36 and all(p.is_symlink() for p in files)
    assert all(os.path.realpath(p).startswith(str(train.resolve())) for p in files)
    gallery = {os.path.realpath(p) for p in split.gallery_dir.rglob("*.png")}
    queries = {os.path.realpath(p) for p in split.query_dir.rglob("*.png")}
    assert not gallery & queries
    # opqn_main.py reads it as the synthface it was made from.
    from data.synthface import use_synthface

    assert "using" in use_synthface(split.data_dir)[1]
    # Reused when made the same way; refused when made otherwise.
    again = build_validation_split(train, (test,), tmp_path / "val", "synthface", False, 2)
    assert again.info == split.info
    with pytest.raises(ValidationSplitError, match="per_identity"):
        build_validation_split(train, (test,), tmp_path / "val", "synthface", False, 3)


def test_validation_leak_check_catches_a_query_in_the_gallery_and_a_test_file(tiny_data_dir,
                                                                             tmp_path):
    train, test = tiny_data_dir / "synthface" / "train", tiny_data_dir / "synthface" / "test"
    split = build_validation_split(train, (test,), tmp_path / "val", "synthface", False, 1)
    query = next(split.query_dir.rglob("*.png"))
    leak = split.gallery_dir / query.parent.name / "leak.png"
    leak.symlink_to(os.path.realpath(query))
    with pytest.raises(ValidationSplitError, match="also in the validation gallery"):
        check_validation_split(split.gallery_dir, split.query_dir, train, (test,))
    leak.unlink()
    test_file = next(test.rglob("*.png"))
    leak.symlink_to(test_file.resolve())
    with pytest.raises(ValidationSplitError, match="in the test split"):
        check_validation_split(split.gallery_dir, split.query_dir, train, (test,))


# ---------------------------------------------------------------- the tool


def _tool(*argv, cwd=REPO, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "utils.comparison", *argv],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.parametrize("argv, fragment", [
    (["--sgd-lrs", "-0.1"], "--sgd-lrs: must be a positive number"),
    (["--seeds", "0"], "--seeds: must be a positive number"),
    (["--min-loss-drop", "1.5"], "--min-loss-drop: must be in [0, 1)"),
])
def test_bad_flags_are_one_line_errors(argv, fragment, capsys):
    tool = _load_tool()
    with pytest.raises(SystemExit) as exc:
        tool.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("python -m utils.comparison: error:")
    assert fragment in err


def test_flags_the_protocol_sets_are_refused_after_the_separator(capsys):
    tool = _load_tool()
    assert tool.main(["--", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lr after -- is set by the protocol" in err
    # What a training run would refuse is refused before any run.
    assert tool.main(["--", "--export-faiss", "g.faiss"]) == 2
    assert "--export-faiss works with -e" in capsys.readouterr().err
    given, flags = tool.run_flags(["--bs", "8"])
    assert flags == ["--bs", "8", "--amp", "off"] and given.amp == "off"
    assert tool.run_flags(["--amp", "bf16"])[1] == ["--amp", "bf16"]
    assert tool.run_flags(["--amp=auto"])[1] == ["--amp=auto"]


def test_runner_commands_keep_the_test_split_for_the_final_evaluation(tmp_path, monkeypatch):
    """Grid runs read the validation folder and monitor it; final runs read the real data
    with the monitoring off; with -c the final model is evaluated by -e -c."""
    tool = _load_tool()
    args, _ = tool.parse_args(["--len", "12", "--num", "2", "--data-dir", str(tmp_path / "d"),
                               "--val-every", "2"])
    split = type("Split", (), {"data_dir": tmp_path / "val"})()
    flags = ["--schedule", "cosine", "--warmup", "1", "--adam-betas", "0.5", "0.9", "--bs",
             "8", "--amp", "off"]
    runner = tool.OpqnMainRunner(args, flags, tmp_path / "work", True, split, "off",
                                 "float32")
    calls = []

    def fake_call(cmd, _log):
        calls.append(cmd)
        results = tmp_path / "work" / "results"
        results.mkdir(parents=True, exist_ok=True)
        name = cmd[cmd.index("--save") + 1][:-4] if "--save" in cmd else \
            os.path.basename(cmd[cmd.index("--load") + 1])[:-4] + "_on_synthface_cross"
        (results / f"{name}.json").write_text(json.dumps({"mAP": 0.5, "k": 5}))
        return 0, None

    monkeypatch.setattr(runner, "_call", fake_call)
    monkeypatch.setattr(runner, "_checkpoint_facts", lambda _last: {"history": []})
    plan = MethodPlan("opqn", "sgd", 0.1, (0.1,))
    # A run interrupted after an epoch (its last checkpoint is there) continues.
    checkpoints = tmp_path / "work" / "checkpoint"
    checkpoints.mkdir(parents=True)
    (checkpoints / "final_opqn_lr0.1_seed2_e3.last.tar").touch()
    assert "--resume" in runner._command(RunKey("final", "opqn", 0.1, 2, 3), plan)
    assert "--resume" not in runner._command(RunKey("final", "opqn", 0.1, 1, 3), plan)
    tune = runner(RunKey("tune", "opqn", 0.1, 0, 2), plan)
    final = runner(RunKey("final", "opqn", 0.1, 1, 3), plan)
    assert tune["mAP"] == final["mAP"] == 0.5 and final["data"] == "test"
    grid_cmd, train_cmd, eval_cmd = calls
    value = lambda cmd, flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert value(grid_cmd, "--data-dir") == str(tmp_path / "val")
    assert value(grid_cmd, "--eval-every") == "2" and "-c" in grid_cmd
    assert value(train_cmd, "--data-dir") == str((tmp_path / "d").resolve())
    assert value(train_cmd, "--eval-every") == "0" and value(train_cmd, "--seed") == "1"
    assert value(train_cmd, "--amp") == "off" and value(train_cmd, "--epochs") == "3"
    assert eval_cmd[2:4] == ["-e", "-c"] and value(eval_cmd, "--data-dir") == \
        str((tmp_path / "d").resolve())
    # -e refuses what only training reads (it failed every -c final run before): the
    # evaluation gets the other flags, and opqn_main.py accepts its command line.
    assert train_cmd[-len(flags):] == flags
    assert eval_cmd[eval_cmd.index("--no-progress") + 1:] == ["--bs", "8", "--amp", "off"]
    import opqn_main
    from utils.cli.validation import check_options

    check_options(opqn_main.build_parser().parse_args(eval_cmd[2:]))


@pytest.mark.slow
def test_the_tool_end_to_end_writes_the_table_and_reuses_finished_runs(tiny_data_dir,
                                                                       tmp_path):
    """Real runs on the tiny synthface (one method, one seed, two rates: the grids are
    equalised over all five methods, and DPQ's holds 0.1 and 0.01; three opqn_main.py
    processes), then the same command again, as after an interruption: every finished run
    is reused and its record left untouched."""
    argv = ["--methods", "opqn", "--len", "12", "--num", "2", "--seeds", "1", "--sgd-lrs",
            "0.1", "--adam-lrs", "2e-4", "--tune-epochs", "1", "--epochs", "1", "--val-per-identity", "2",
            "--val-every", "1", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path),
            "--", "--width", "8", "--bs", "8", "--workers", "0"]
    first = _tool(*argv)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "runs 3/3" in first.stdout and "reused" not in first.stdout
    records = tmp_path / "runs_synthface_12bits" / "records"
    stamps = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(stamps) == 3
    second = _tool(*argv)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("reused") == 3 and "starting" not in second.stdout
    assert all(records.joinpath(n).stat().st_mtime_ns == t for n, t in stamps.items())
    table = json.loads((tmp_path / "compare_synthface_12bits_e1_opqn.json").read_text())
    assert (table["protocol"], table["dataset"], table["bits"], table["selection"]) == \
        ("standard", "synthface", 12, "validation")
    assert table["precision"] == "float32" and table["validation"]["query_images"] == 12
    entry = table["methods"]["opqn"]
    assert [g["lr"] for g in entry["lr_grid"]] == [0.1, 0.0316]
    assert entry["chosen_lr"] in (0.1, 0.0316)
    assert entry["lr_grid"][0]["val_mAP"] is not None and entry["seeds"] == [0]
    final = f"final_opqn_lr{entry['chosen_lr']:.6g}_seed0_e1.json"
    run = json.loads((records / final).read_text())["outcome"]
    assert entry["test_mAP"] == [run["mAP"]] == [entry["mean_mAP"]]
    assert run["precision"] == "float32" and run["wall_seconds"] > 0
    assert run["num_queries"] == 30 and run["num_database"] == 36  # the test split
    tune = json.loads((records / "tune_opqn_lr0.1_seed0_e1.json").read_text())["outcome"]
    assert tune["num_queries"] == 12 and tune["num_database"] == 24  # the validation split
    assert tune["history"][0]["monitor_mAP"] is not None  # the validation curve
    assert "monitor_mAP" not in run["history"][0]  # the test split is used once
    md = (tmp_path / "compare_synthface_12bits_e1_opqn.md").read_text()
    assert "| OPQN |" in md and "float32" in md
    for suffix in ("_pr.png", "_loss.png", "_val.png"):
        assert (tmp_path / f"compare_synthface_12bits_e1_opqn{suffix}").stat().st_size > 0
    # The test split was never linked into the validation folder; grid checkpoints are gone.
    val = tmp_path / "runs_synthface_12bits" / "validation"
    test = (tiny_data_dir / "synthface" / "test").resolve()
    assert not any(os.path.realpath(p).startswith(str(test)) for p in val.rglob("*.png"))
    assert not list((tmp_path / "runs_synthface_12bits" / "checkpoint").glob("tune_*"))


def test_a_tiny_split_keeps_two_thirds_of_each_identity_for_the_gallery(tiny_data_dir):
    from data.validation_split import queries_per_identity

    train = tiny_data_dir / "synthface" / "train"  # 6 images per identity
    assert queries_per_identity(train, 5) == 2
    assert queries_per_identity(train, 1) == 1


def test_late_gain_tells_a_curve_that_still_rises_from_one_that_levelled_off():
    from utils.comparison.plan import late_gain

    rising = [[5, 0.2], [10, 0.4], [15, 0.5], [20, 0.6], [25, 0.65], [30, 0.72]]
    assert late_gain(rising) == pytest.approx(0.72 - 0.6)
    flat = [[5, 0.2], [10, 0.6], [15, 0.7], [20, 0.71], [25, 0.70], [30, 0.71]]
    assert late_gain(flat) == pytest.approx(0.0)
    assert late_gain([[1, 0.1], [2, 0.2]]) is None


def test_the_report_ranks_trained_methods_and_is_rebuilt_from_its_json(tmp_path):
    from utils.comparison.report import grid_edge, markdown, write_report

    tool = _load_tool()
    plan = _plan()
    summary = run_comparison(plan, RunStore(tmp_path / "records"), FakeRunner(),
                             say=lambda _line: None)
    table = {"protocol": "standard", "dataset": "synthface", "bits": 12,
             "selection": "validation", "epochs": plan.epochs, "tune_epochs": plan.tune_epochs,
             "validation": {"per_identity": 2, "identities": 6, "gallery_images": 24,
                            "query_images": 12},
             "schedule": {"name": "step", "lr_step": 15}, "seeds": plan.seeds, "amp": "off",
             "precision": "float32", "command": "python -m utils.comparison", **summary}
    tool._add_run_facts(table)
    written = write_report(table, tmp_path / "compare_synthface_12bits")
    assert [p.name for p in written] == [
        "compare_synthface_12bits.json", "compare_synthface_12bits.md",
        "compare_synthface_12bits_pr.png", "compare_synthface_12bits_loss.png"]
    md = written[1].read_text()
    assert markdown(json.loads(written[0].read_text())) == md  # rebuilt from the JSON alone
    rows = [line for line in md.splitlines() if line.startswith("| ") and "bits (" in line]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| 1", "OPQN"], ["| 2", "DCDH"], ["| did not train", "DPQ"]]
    opqn = table["methods"]["opqn"]
    assert f"{100 * opqn['mean_mAP']:.2f} ± {100 * opqn['sd_mAP']:.2f}%" in rows[0]
    assert "Did not train (not ranked):" in md and "- DPQ, seed 0: loss fell" in md
    edges = {e["name"]: edge for e in table["methods"].values() if (edge := grid_edge(e))}
    assert edges, "the fake grid should put some choice at an edge"
    note = next(line for line in md.splitlines() if line.startswith("Chosen at the edge"))
    assert all(f"{name} at its {edge} rate" in note for name, edge in edges.items())
    # A verdict whose pair has a rate at a grid edge says it is provisional; others do not.
    for row in rows:
        name = row.split(" | ")[1]
        if name == "OPQN" or "did not train" in row:
            continue
        pair_edges = [n for n in ("OPQN", name) if n in edges]
        assert ("provisional: lr of " + " and ".join(pair_edges) in row) == bool(pair_edges)
    assert table["methods"]["dcdh"]["precision"] == ["float32"]
    assert table["methods"]["opqn"]["pr_curve"]["precision"][0] == pytest.approx(
        statistics.fmean(opqn["test_mAP"]))  # the mean curve over the seeds


def test_a_rate_chosen_at_the_edge_of_its_grid_is_named():
    from utils.comparison.report import grid_edge

    def entry(chosen, statuses=("done", "done", "done")):
        rates = (0.1, 0.03, 0.009)
        return {"chosen_lr": chosen, "lr_grid": [{"lr": lr, "status": status}
                                                 for lr, status in zip(rates, statuses)]}

    assert grid_edge(entry(0.1)) == "highest"
    assert grid_edge(entry(0.009)) == "lowest"
    assert grid_edge(entry(0.03)) is None
    # a diverged rate is not one the choice was made among
    assert grid_edge(entry(0.03, ("diverged", "done", "done"))) == "highest"
    assert grid_edge(entry(0.03, ("diverged", "done", "diverged"))) is None
    assert grid_edge(entry(None)) is None


def test_a_diverged_run_is_recorded_and_any_other_failure_stops(tmp_path, monkeypatch):
    tool = _load_tool()
    args, _ = tool.parse_args(["--data-dir", str(tmp_path)])
    split = type("Split", (), {"data_dir": tmp_path / "val"})()
    runner = tool.OpqnMainRunner(args, [], tmp_path / "work", False, split, "off", "float32")
    plan = MethodPlan("opqn", "sgd", 0.1, (0.3,))
    key = RunKey("tune", "opqn", 0.3, 0, 2)
    monkeypatch.setattr(runner, "_call", lambda _cmd, _log: (
        EXIT_DIVERGED, "opqn_main.py: error: training loss became nan at epoch 2; stopped."))
    outcome = runner(key, plan)
    assert outcome["status"] == "diverged" and outcome.get("mAP") is None
    assert "nan" in outcome["error"]
    monkeypatch.setattr(runner, "_call", lambda _cmd, _log: (1, "opqn_main.py: error: disk full"))
    with pytest.raises(tool.RunFailed, match="tune_opqn_lr0.3_seed0_e2 failed: .*disk full"):
        runner(key, plan)


@pytest.mark.slow
def test_a_sabotaged_run_is_flagged_for_every_method(tiny_data_dir, tmp_path):
    """Real opqn_main.py runs at lr 1e-7 (nothing moves): every method "did not train",
    whatever its loss parts."""
    tool = _load_tool()
    args, _ = tool.parse_args(["--len", "12", "--num", "2", "--data-dir", str(tiny_data_dir),
                               "--val-every", "0"])
    flags = ["--width", "8", "--bs", "8", "--workers", "0", "--amp", "off"]
    runner = tool.OpqnMainRunner(args, flags, tmp_path / "work", False, None, "off",
                                 "float32")
    plan = ComparisonPlan([], [0], epochs=2, tune_epochs=2, settings={})
    from utils.comparison.plan import _failures

    for method in METHODS:
        optimizer = get_method(method).optimizer_for(32)
        method_plan = MethodPlan(method, optimizer, get_method(method).default_lr(optimizer), ())
        outcome = runner(RunKey("final", method, 1e-7, 0, 2), method_plan)
        reasons = _failures(outcome, plan)
        assert reasons and outcome["ce_chance"], (method, outcome["history"])


def test_the_budget_is_the_shortest_after_which_no_method_gains():
    from utils.comparison.plan import sufficient_budget

    fast = {8: 0.70, 16: 0.705, 24: 0.708}  # enough at 8
    slow = {8: 0.50, 16: 0.66, 24: 0.665}  # enough at 16
    assert sufficient_budget({"fast": fast}) == 8
    assert sufficient_budget({"slow": slow}) == 16
    assert sufficient_budget({"fast": fast, "slow": slow}) == 16
    # A rise past a plateau counts: a later budget may not gain either.
    late = {8: 0.6, 16: 0.6, 24: 0.7, 32: 0.705}
    assert sufficient_budget({"late": late}) == 24
    assert sufficient_budget({"late": late}, max_rise=0.2) == 8
    # A dip below a plateau is not a rise: stopped at 8 means stopped at 16 too.
    dip = {8: 0.863, 16: 0.853, 24: 0.864}
    assert sufficient_budget({"dip": dip}) == 8
    assert sufficient_budget({"dip": dip, "slow": slow}) == 16
    # Still rising at the longest budget, or a run missing: no budget.
    assert sufficient_budget({"rising": {8: 0.5, 16: 0.6, 24: 0.7}}) is None
    assert sufficient_budget({"fast": fast, "gap": {8: 0.5, 16: None, 24: 0.5}}) is None
    assert sufficient_budget({"gap": {8: None, 16: 0.5, 24: 0.5}}) == 16


def test_the_ranking_settles_where_no_longer_budget_reorders_the_methods():
    from utils.comparison.plan import settled_ranking_budget

    a = {10: 0.70, 20: 0.78, 30: 0.84}  # still rising, always first
    b = {10: 0.63, 20: 0.72, 30: 0.76}
    c = {10: 0.64, 20: 0.68, 30: 0.70}  # ahead of b at 10 only
    assert settled_ranking_budget({"a": a, "b": b, "c": c}) == 20
    assert settled_ranking_budget({"a": a, "b": b}) == 10
    assert settled_ranking_budget({"a": a, "c": {10: 0.6, 20: 0.7, 30: 0.9}}) is None
    assert settled_ranking_budget({"a": a, "b": {10: 0.6, 20: None, 30: 0.7}}) is None



# ---------------------------------------------------------------- method defaults, precision


@pytest.mark.parametrize("change", ["dpq_init", "weight_decay", "default_lr", "adam"])
def test_a_record_made_before_a_method_default_changed_is_stale(change, tmp_path, monkeypatch):
    """A record is checked against its method's resolved defaults: once one changes, the
    old record is refused (StaleRun), never reused as if made under the new default."""
    import dataclasses

    import models.methods.registry as registry

    tool = _load_tool()
    args, extra = tool.parse_args(["--methods", "opqn", "dpq", "dcdh", "--seeds", "1",
                                   "--sgd-lrs", "0.1", "--adam-lrs", "5e-4"])
    given, _flags = tool.run_flags(extra)

    def plan() -> ComparisonPlan:
        return ComparisonPlan(tool.method_plans(args, given, 32), [0], epochs=4,
                              tune_epochs=3, settings=SETTINGS)

    run_comparison(plan(), RunStore(tmp_path), FakeRunner(), say=lambda _line: None)
    again = FakeRunner()
    run_comparison(plan(), RunStore(tmp_path), again, say=lambda _line: None)
    assert again.calls == []  # the same defaults: every record reused
    method = {"dpq_init": "dpq", "weight_decay": "opqn", "default_lr": "dpq",
              "adam": "dcdh"}[change]
    spec = registry.get_method(method)

    def respec(**changes) -> None:
        monkeypatch.setitem(registry._REGISTRY, method, dataclasses.replace(spec, **changes))

    if change == "dpq_init":  # the flag's default (opqn_main.py builds it from the spec)
        changed = dataclasses.make_dataclass("DPQParams", [
            (f.name, f.type, dataclasses.field(
                default="normal" if f.name == "dpq_init" else f.default, metadata=f.metadata))
            for f in dataclasses.fields(spec.params)], frozen=True)
        respec(params=changed)
        given, _flags = tool.run_flags(extra)
    elif change == "weight_decay":
        monkeypatch.setattr(registry, "SGD_WEIGHT_DECAY", 1e-3)
    elif change == "default_lr":  # the old default stays in the grid: same run keys
        respec(authors_sgd_lr=0.1, sgd_lr=0.01)
    else:
        respec(adam=registry.AdamForm(lr=0.005, weight_decay=1e-4, amsgrad=False))
    with pytest.raises(StaleRun, match=rf"{method}_lr.*settings\.method"):
        run_comparison(plan(), RunStore(tmp_path), FakeRunner(), say=lambda _line: None)


def test_amp_auto_labels_each_method_with_the_precision_it_trains_in(monkeypatch):
    """Under --amp auto on a device where OPQN trains in bf16 (an AMX CPU here), a method
    that auto keeps in float32 is labelled float32, not bf16 as OPQN."""
    from utils.comparison.report import precision_text
    from models.methods import get_method

    monkeypatch.setenv("OPQN_CPU_BF16_PROBE", "amx")
    tool = _load_tool()
    args, extra = tool.parse_args(["--", "--amp", "auto", "--device", "cpu"])
    given, flags = tool.run_flags(extra)
    assert flags == ["--amp", "auto", "--device", "cpu"]
    labels = {p.method: p.settings["precision"] for p in tool.method_plans(args, given, 32)}
    assert labels["opqn"] == "bf16"
    assert labels == {m: "float32" if get_method(m).bf16 == "float32" else "bf16"
                      for m in ("opqn", "l2q", "dpq", "gpq", "dcdh")}
    assert labels["l2q"] == labels["dpq"] == "float32"
    label = tool.precision_label(tool.method_plans(args, given, 32))
    assert label == labels
    text = precision_text(label, tool.titles())
    assert "per method" in text and "OPQN bf16" in text and "DPQ float32" in text
    # OPQN without precise BN: auto keeps it in float32 too.
    given, _ = tool.run_flags([*extra, "--precise-bn", "0"])
    assert tool.method_plans(args, given, 32)[0].settings["precision"] == "float32"
    # Where no method can use bf16, one precision for all.
    monkeypatch.setenv("OPQN_CPU_BF16_PROBE", "none")
    assert tool.precision_label(tool.method_plans(args, given, 32)) == "float32"


def test_an_outcome_holds_the_checkpoints_precision_config_and_settings(tmp_path, monkeypatch):
    """The record says what the checkpoint trained in, and a run that trained in another
    precision than planned fails loudly instead of being relabelled."""
    from utils.checkpoints.store import save_checkpoint

    tool = _load_tool()
    args, _ = tool.parse_args(["--data-dir", str(tmp_path)])
    split = type("Split", (), {"data_dir": tmp_path / "val"})()
    work = tmp_path / "work"
    runner = tool.OpqnMainRunner(args, [], work, False, split, "auto", "float32")
    key = RunKey("final", "dpq", 0.1, 0, 2)
    from models import NetConfig

    config = NetConfig(num_books=2, num_words=64, feature_dim=64, num_classes=6,
                        method="dpq").to_dict()
    settings = {"lr": 0.1, "weight_decay": 5e-4, "amp": "auto"}

    def fake_call(cmd, _log):
        (work / "results").mkdir(parents=True, exist_ok=True)
        (work / "results" / f"{key.name}.json").write_text(json.dumps({"mAP": 0.5, "k": 5}))
        save_checkpoint({"config": config, "train_settings": settings, "history": [],
                         "train_precision": "float32", "epoch": 2},
                        work / "checkpoint" / f"{key.name}.last.tar")
        return 0, None

    monkeypatch.setattr(runner, "_call", fake_call)
    outcome = runner(key, MethodPlan("dpq", "sgd", 0.1, (0.1,), {"precision": "float32"}))
    assert outcome["precision"] == "float32"
    assert outcome["config"] == config and outcome["train_settings"] == settings
    with pytest.raises(tool.RunFailed, match=rf"{key.name} trained in float32, but the "
                                              r"comparison expected bf16 for dpq"):
        runner(key, MethodPlan("dpq", "sgd", 0.1, (0.1,), {"precision": "bf16"}))


@pytest.mark.slow
def test_measure_budget_runs_each_budget_once_and_writes_its_report(tiny_data_dir, tmp_path):
    argv = ["--methods", "opqn", "--len", "12", "--num", "2", "--measure-budget", "1", "2",
            "--val-per-identity", "2", "--val-every", "1", "--data-dir", str(tiny_data_dir),
            "--out", str(tmp_path), "--", "--width", "8", "--bs", "8", "--workers", "0",
            "--schedule", "cosine"]
    first = _tool(*argv)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("starting tune opqn lr 0.1") == 2
    assert "[synthface_12bits, 2 epochs] runs 1/1" in first.stdout  # which budget counts
    report = json.loads((tmp_path / "budget_synthface_12bits_opqn.json").read_text())
    assert report["budgets"] == [1, 2] and set(report["val_mAP"]["opqn"]) == {"1", "2"}
    scores = report["val_mAP"]["opqn"]
    assert report["budget"] == (1 if scores["2"] - scores["1"] < 0.01 else None)
    assert "| opqn | 0.1 |" in (tmp_path / "budget_synthface_12bits_opqn.md").read_text()
    assert (tmp_path / "budget_synthface_12bits_opqn.png").stat().st_size > 0
    again = _tool(*argv)  # finished budget runs are reused
    assert again.returncode == 0 and "starting" not in again.stdout
    other = _tool(*argv[:7], "1", "--budget-lr", "opqn=0.05", *argv[9:])
    assert other.returncode == 0, other.stderr[-2000:]
    assert "starting tune opqn lr 0.05 seed 0 (1 epochs)" in other.stdout
    assert (tmp_path / "runs_synthface_12bits" / "records"
            / "tune_opqn_lr0.05_seed0_e1.json").is_file()  # the key the lr grid looks for
    assert json.loads((tmp_path / "budget_synthface_12bits_opqn_opqn0.05.json").read_text())[
        "lr"] == {"opqn": 0.05}
    assert json.loads((tmp_path / "budget_synthface_12bits_opqn.json").read_text()) == report


def test_reports_of_other_budgets_or_of_some_methods_never_share_a_file():
    """A process of a comparison split by --methods, or the same comparison at another
    --epochs, used to write over the whole table's compare_<tag>.* files."""
    tool = _load_tool()

    def stems(*argv, epochs=160):
        args, _ = tool.parse_args(list(argv))
        return tool.compare_stem(args, "fashion_24bits", epochs), \
            tool.budget_stem(args, "fashion_24bits")

    whole = stems()
    assert whole == ("compare_fashion_24bits_e160", "budget_fashion_24bits")
    assert stems(epochs=320)[0] == "compare_fashion_24bits_e320"
    assert stems("--methods", "dcdh", "opqn", "l2q", "gpq", "dpq") == whole  # all five
    assert stems("--methods", "dpq") == ("compare_fashion_24bits_e160_dpq",
                                         "budget_fashion_24bits_dpq")
    assert stems("--measure-budget", "5", "--budget-lr", "dpq=0.03")[1] == \
        "budget_fashion_24bits_dpq0.03"


@pytest.mark.parametrize("argv, message", [
    (["--budget-lr", "opqn=0.05"], "--budget-lr goes with --measure-budget"),
    (["--measure-budget", "5", "--budget-lr", "pq=0.05"], "expected METHOD=LR"),
    (["--measure-budget", "5", "--budget-lr", "opqn=-1"], "must be a positive number"),
    (["--measure-budget", "5", "--budget-lr", "opqn=0.1", "opqn=0.2"], "one METHOD=LR"),
    (["--measure-budget", "5", "--methods", "dpq", "--budget-lr", "opqn=0.1"],
     "not in --methods: opqn"),
])
def test_budget_lr_refuses_bad_use(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        _load_tool().parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_comparison_split_by_methods_runs_the_grids_of_the_whole_one():
    """Two processes with --methods opqn l2q and --methods dpq gpq dcdh must try the same
    rates as one process with all five (the grids are equalised over all methods)."""
    tool = _load_tool()

    def grids(*methods):
        args, extra = tool.parse_args(["--methods", *methods, "--sgd-lrs", "0.1", "0.03",
                                       "--adam-lrs", "2e-3", "5e-4"])
        given, _ = tool.run_flags(extra)
        return {p.method: p.grid for p in tool.method_plans(args, given, 32)}

    whole = grids("opqn", "l2q", "dpq", "gpq", "dcdh")
    assert grids("opqn", "l2q") == {m: whole[m] for m in ("opqn", "l2q")}
    assert grids("gpq") == {"gpq": whole["gpq"]}
    assert len({len(g) for g in whole.values()}) == 1 and len(whole["opqn"]) == 3


def test_report_header_names_the_schedule_that_ran():
    from utils.comparison.report import schedule_text

    assert schedule_text({"name": "cosine", "lr_step": 35, "warmup": 0}) == "cosine to 0"
    assert schedule_text({"name": "cosine", "lr_step": 35, "warmup": 2}) == \
        "cosine to 0 after 2 warmup epochs"
    assert schedule_text({"name": "step", "lr_step": 15}) == "step (lr halved every 15 epochs)"


def test_the_old_command_path_forwards_to_the_tool(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare_methods.py"),
                          "--seeds", "0"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("python -m utils.comparison: error: argument --seeds: must "
                                  "be a positive number, got 0 (see --help)")


def test_two_processes_building_the_validation_split_at_once_share_it(tiny_data_dir,
                                                                      tmp_path, monkeypatch):
    """Two comparison processes (split over --methods) start together: the one whose split
    lands second uses the first one's instead of failing."""
    import data.validation_split as vs

    train, test = tiny_data_dir / "synthface" / "train", tiny_data_dir / "synthface" / "test"
    root = tmp_path / "val"
    real_rename = os.rename

    def other_process_wins(src, dst):
        if Path(dst).parent != tmp_path:  # the staging inside the split: not the race
            return real_rename(src, dst)
        monkeypatch.setattr(vs.os, "rename", real_rename)
        build_validation_split(train, (test,), dst, "synthface", False, 2)  # lands first
        real_rename(src, dst)  # fails: the folder is there now

    monkeypatch.setattr(vs.os, "rename", other_process_wins)
    split = build_validation_split(train, (test,), root, "synthface", False, 2)
    assert split.info["identities"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]  # no stage left behind
    # A split made another way by the other process is still refused, in one line.
    monkeypatch.setattr(vs.os, "rename", other_process_wins)
    with pytest.raises(ValidationSplitError, match="made differently"):
        build_validation_split(train, (test,), tmp_path / "val3", "synthface", False, 3)


def test_a_budget_report_of_cross_runs_says_it_is_the_cross_protocol(tmp_path):
    """The budget report of -c runs used to read as the standard protocol's."""
    from types import SimpleNamespace
    from utils.comparison.report import write_budget_report

    args = SimpleNamespace(dataset="synthface", len=36, num=6, max_rise=0.01,
                           budget_lr={"opqn": 0.009}, command="python -m utils.comparison")

    def run(epochs, score, protocol):
        return {"key": {"phase": "tune", "method": "opqn", "lr": 0.009, "seed": 0,
                        "epochs": epochs},
                "outcome": {"mAP": score, "history": []}}

    for protocol, says in (("cross", "synthface, -c protocol, 36 bits"),
                           ("standard", "synthface, 36 bits")):
        stem = tmp_path / protocol
        result = write_budget_report([run(160, 0.83, protocol), run(320, 0.85, protocol)],
                                     args, f"synthface_{protocol}_36bits", stem,
                                     protocol=protocol)
        assert result["protocol"] == protocol and result["budget"] is None
        text = (tmp_path / f"{protocol}.md").read_text()
        assert f"after each budget (every run with its own full schedule), {says}." in text

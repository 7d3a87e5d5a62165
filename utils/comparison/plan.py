"""The protocol of ``python -m utils.comparison``, apart from the runs themselves.

* Each method's learning rate is chosen on the validation split from a grid for its
  optimiser that always holds its default and its authors' lr, every method's grid of the
  same size (:func:`lr_grid`, :func:`equal_grids`, :func:`choose_lr`).
* The chosen rate is retrained on the full training split with several seeds; test mAP and
  P@k are reported as mean ± sd (:func:`mean_sd`), and OPQN's paired difference to every
  method with its sd, 95% interval and verdict over the seeds (:func:`paired_difference`).
* A method whose training loss barely fell, or whose identity cross-entropies stayed near
  their chance levels, "did not train" (:func:`training_failures`) and is not ranked.
* The budget: the shortest after which no method gains (:func:`sufficient_budget`), and
  the shortest from which their order no longer changes (:func:`settled_ranking_budget`).
* Every finished run is a JSON record (:class:`RunStore`), keyed by phase, method, lr, seed
  and epochs and checked against the comparison's settings and the method's resolved
  defaults (:func:`run_settings`): an interrupted comparison continues where it stopped,
  and a finished run is never silently replaced.

:func:`run_comparison` drives it all with a runner given by the caller (a subprocess of
``opqn_main.py`` in the tool, a fake one in the tests) and :func:`summarise` turns the
records into the table's numbers, so that a table can always be rebuilt from its records.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from utils.atomic_io import atomic_write_text
from models.methods import DEFAULT_METHOD, get_method

PHASES = ("tune", "final")
REFERENCE = DEFAULT_METHOD  # the paired differences are OPQN minus each method


@dataclass(frozen=True)
class RunKey:
    """What identifies one training run of a comparison."""

    phase: str  # "tune": validation split; "final": full training split, test split
    method: str
    lr: float
    seed: int
    epochs: int

    @property
    def name(self) -> str:
        """File-name stem of the run's record, checkpoint, results and log."""
        return f"{self.phase}_{self.method}_lr{self.lr:.6g}_seed{self.seed}_e{self.epochs}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MethodPlan:
    """One method's optimiser, its default lr and the grid tried on validation."""

    method: str
    optimizer: str
    default_lr: float
    grid: tuple[float, ...]
    # What the method's runs resolve besides lr and seed (its defaults, its precision): part
    # of its records' settings, so that a changed default makes an old record stale.
    settings: dict = field(default_factory=dict, hash=False)


@dataclass
class ComparisonPlan:
    """Everything :func:`run_comparison` needs besides the runner and the store."""

    methods: list[MethodPlan]
    seeds: list[int]
    epochs: int
    tune_epochs: int
    settings: dict  # what every record must have been made with (flags, data, precision)
    tune_seed: int = 0
    min_loss_drop: float = 0.05
    ce_margin: float = 0.1

    @property
    def total_runs(self) -> int:
        return sum(len(m.grid) for m in self.methods) + len(self.methods) * len(self.seeds)


def lr_grid(method: str, optimizer: str, sgd_lrs: Sequence[float],
            adam_lrs: Sequence[float], size: int | None = None) -> tuple[float, ...]:
    """The grid of the method's optimiser plus its default
    (``MethodSpec.default_lr``) and its authors' lr (``MethodSpec.authors_lr``), largest
    first.

    With ``size``, a shorter grid is extended to ``size`` rates, so that every method gets
    the same tuning effort: one geometric step below its smallest rate, then one above its
    largest, and so on; the step is the optimiser grid's mean ratio (√10 for one rate)."""
    given = sorted(set(sgd_lrs if optimizer == "sgd" else adam_lrs))
    spec = get_method(method)
    grid = set(given) | {spec.default_lr(optimizer), spec.authors_lr(optimizer)}
    if size is not None and len(grid) > size:
        raise ValueError(f"the {method} grid already holds {len(grid)} rates, over {size}")
    step = (given[-1] / given[0]) ** (1 / (len(given) - 1)) if len(given) > 1 else 10 ** 0.5
    below = True
    while size is not None and len(grid) < size:
        grid.add(float(f"{min(grid) / step:.3g}") if below else float(f"{max(grid) * step:.3g}"))
        below = not below
    return tuple(sorted(grid, reverse=True))


def equal_grids(methods: Sequence[tuple[str, str]], sgd_lrs: Sequence[float],
                adam_lrs: Sequence[float]) -> dict[str, tuple[float, ...]]:
    """Every ``(method, optimizer)``'s :func:`lr_grid`, all extended to the largest one's
    size: the same number of learning rates for every method."""
    size = max(len(lr_grid(m, o, sgd_lrs, adam_lrs)) for m, o in methods)
    return {m: lr_grid(m, o, sgd_lrs, adam_lrs, size) for m, o in methods}


def choose_lr(grid: Sequence[dict], default: float) -> float | None:
    """The lr of the highest ``val_mAP`` in ``grid`` (entries ``{"lr", "val_mAP"}``; None
    for a run that diverged). Ties (e.g. every lr at chance) go to the default, else to
    the smallest lr. None when no run of the grid finished."""
    scored = [g for g in grid if g.get("val_mAP") is not None]
    if not scored:
        return None
    best = max(g["val_mAP"] for g in scored)
    tied = [g["lr"] for g in scored if g["val_mAP"] == best]
    return default if default in tied else min(tied)


def mean_sd(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of the values that are not None; the sd
    is None below two values, both are None without values."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else None


VERDICTS = ("better", "worse", "no detectable difference")


def paired_difference(reference: dict[int, float | None],
                      other: dict[int, float | None], confidence: float = 0.95) -> dict:
    """``reference − other`` seed by seed over the seeds both have: its mean, sd, the
    Student-t ``confidence`` interval of the mean (``ci``, None below two seeds) and the
    verdict on the reference: "better" when the interval lies above 0, "worse" below 0,
    else "no detectable difference"."""
    seeds = sorted(s for s in set(reference) & set(other)
                   if reference[s] is not None and other[s] is not None)
    values = [reference[s] - other[s] for s in seeds]
    mean, sd = mean_sd(values)
    ci = None
    if sd is not None:
        from scipy.stats import t

        half = t.ppf(0.5 + confidence / 2, len(values) - 1) * sd / math.sqrt(len(values))
        ci = [float(mean - half), float(mean + half)]
    verdict = VERDICTS[2] if ci is None else \
        VERDICTS[0] if ci[0] > 0 else VERDICTS[1] if ci[1] < 0 else VERDICTS[2]
    return {"seeds": seeds, "values": values, "mean": mean, "sd": sd,
            "confidence": confidence, "ci": ci, "verdict": verdict}


def training_failures(history: Sequence[dict], chance: dict[str, float] | None,
                      min_loss_drop: float = 0.05, ce_margin: float = 0.1) -> list[str]:
    """Why a run "did not train" (empty when it did), from its per-epoch records and the
    chance levels of its identity cross-entropies (``models.methods.chance_levels``):

    * its last epoch's loss is less than ``min_loss_drop`` (relative) below the loss it
      started from: the first step's (``first_step_loss`` of epoch 1, so that a one-epoch
      run is tested too), else the first epoch's mean;
    * even its best identity cross-entropy in the last epoch is at least ``1 − ce_margin``
      of that part's chance level, the loss of a model that knows nothing (``log C``, or far
      above it under a margin);
    * the chance levels are unknown (None or empty): whether it trained cannot be told.
    """
    reasons: list[str] = []
    if not history:
        return ["no epoch was recorded"]
    first = history[0].get("first_step_loss")
    since = "its first step"
    if first is None and len(history) >= 2:
        first, since = history[0]["loss"], "epoch 1"
    if first is not None:
        last = history[-1]["loss"]
        drop = (first - last) / abs(first) if first else 0.0
        if not drop >= min_loss_drop:  # also a NaN
            reasons.append(f"loss fell {100 * drop:.1f}% from {since} ({first:.4g}) to epoch "
                           f"{len(history)} ({last:.4g}), under {100 * min_loss_drop:g}%")
    if not chance:
        return reasons + ["no chance level of its cross-entropies was recorded"]
    parts = {p: history[-1][p] / level for p, level in chance.items() if p in history[-1]}
    if not parts:
        return reasons + [f"its history holds none of the cross-entropies {sorted(chance)}"]
    name, ratio = min(parts.items(), key=lambda item: item[1])
    if not ratio < 1 - ce_margin:
        reasons.append(f"cross-entropy {name} {history[-1][name]:.3g} not below chance level "
                       f"(at least {1 - ce_margin:g} x {chance[name]:.3g}, the loss of a "
                       f"model that knows nothing)")
    return reasons


def late_gain(points: Sequence[Sequence[float]]) -> float | None:
    """How much a validation curve (``[epoch, mAP]`` pairs) rose over the last third of its
    epochs; None with fewer than three points or none in the first two thirds. A clear
    rise means the budget was too short for the curve to level off."""
    if len(points) < 3:
        return None
    earlier = [value for epoch, value in points if epoch <= points[-1][0] * 2 / 3]
    return points[-1][1] - earlier[-1] if earlier else None


def sufficient_budget(scores: dict[str, dict[int, float | None]],
                      max_rise: float = 0.01) -> int | None:
    """The shortest budget after which no method gains: ``scores`` holds, per method, the
    validation mAP of a run of each budget (epochs; each run with its own full schedule,
    so this holds for any schedule). The budget chosen is the smallest measured one from
    which no longer measured budget of any method is ``max_rise`` or more above the best
    that method reached at that budget or a shorter one. None when only the longest
    qualifies (still rising: measure longer) or a run is missing."""
    budgets = sorted({int(b) for per in scores.values() for b in per})
    for budget in budgets[:-1]:
        if all(_stopped(per, budget, max_rise) for per in scores.values()):
            return budget
    return None


def settled_ranking_budget(scores: dict[str, dict[int, float | None]]) -> int | None:
    """The shortest budget from which the methods' order by validation mAP (``scores`` as
    :func:`sufficient_budget`'s) is the same at every longer measured budget; None when
    only the longest qualifies or a run is missing."""
    budgets = sorted({int(b) for per in scores.values() for b in per})

    def order(budget: int) -> list[str] | None:
        values = {m: per.get(budget) for m, per in scores.items()}
        if any(v is None for v in values.values()):
            return None
        return sorted(values, key=lambda m: -values[m])

    orders = [order(b) for b in budgets]
    for i, budget in enumerate(budgets[:-1]):
        if orders[i] is not None and all(o == orders[i] for o in orders[i + 1:]):
            return budget
    return None


def _stopped(per: dict[int, float | None], budget: int, max_rise: float) -> bool:
    """No longer budget beats the best value reached up to ``budget`` by ``max_rise``: a
    method that stopped rising at one budget has stopped at every longer one, even where a
    single run dips below its plateau."""
    if per.get(budget) is None:
        return False
    best = max(v for b, v in per.items() if b <= budget and v is not None)
    later = [v for b, v in per.items() if b > budget]
    return all(v is not None and v - best < max_rise for v in later)


class StaleRun(ValueError):
    """A finished run's record was made with other settings than the comparison's."""


def _plain(value):
    """``value`` as JSON gives it back (tuples become lists), so that records compare."""
    return json.loads(json.dumps(value))


class RunStore:
    """One JSON record per finished run, ``<folder>/<key.name>.json``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: RunKey) -> Path:
        return self.folder / f"{key.name}.json"

    def get(self, key: RunKey, settings: dict) -> dict | None:
        """The finished run's record, None when it has not run; :class:`StaleRun` when the
        record exists but was made with other settings."""
        path = self.path(key)
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        wanted = {"key": key.to_dict(), "settings": _plain(settings)}
        differs = sorted(
            f"{part}.{name}" for part in wanted
            for name in set(wanted[part]) | set(record.get(part, {}))
            if record.get(part, {}).get(name) != wanted[part].get(name))
        if differs:
            raise StaleRun(f"the finished run {path} was made with other settings "
                           f"({', '.join(differs)}); it is never replaced silently: use "
                           f"another --out, or delete that file to redo the run")
        return record

    def put(self, key: RunKey, settings: dict, outcome: dict) -> dict:
        """Record a finished run atomically; returns the record."""
        record = _plain({"key": key.to_dict(), "settings": settings, "outcome": outcome})
        atomic_write_text(self.path(key), json.dumps(record, indent=1) + "\n")
        return record


def run_settings(plan: ComparisonPlan, method: MethodPlan) -> dict:
    """The settings a run of ``method`` is recorded with and checked against: the
    comparison's, and the method's own under ``"method"``."""
    return {**plan.settings, "method": method.settings}


Runner = Callable[[RunKey, MethodPlan], dict]
"""Trains (and evaluates) one run; returns its outcome: ``status`` ("done" or "diverged"),
``mAP``, ``precision_at_k``, ``k``, ``history`` (per-epoch records), ``num_classes``,
``ce_chance`` (``models.methods.chance_levels`` of the run's config),
``wall_seconds``, and anything else worth keeping."""


class _Progress:
    """``[tag] runs 3/25: ...`` lines: runs done (or reused) out of the total."""

    def __init__(self, total: int, say: Callable[[str], None], tag: str) -> None:
        self.total, self.done, self.say, self.tag = total, 0, say, tag

    def report(self, key: RunKey, outcome: dict, how: str) -> None:
        self.done += 1
        score = outcome.get("mAP")
        what = "val" if key.phase == "tune" else "test"
        score = f"{what} mAP {100 * score:.2f}%" if score is not None else outcome["status"]
        self.say(f"[{self.tag}] runs {self.done}/{self.total}: {key.phase} {key.method} lr "
                 f"{key.lr:g} seed {key.seed} ({key.epochs} epochs) {how}: {score}")

    def skip(self, count: int, why: str) -> None:
        self.total -= count
        self.say(f"[{self.tag}] {why}: {count} runs dropped, {self.total} in all now")


def run_comparison(plan: ComparisonPlan, store: RunStore, runner: Runner,
                   say: Callable[[str], None] = print, tag: str = "compare") -> dict:
    """Tune every method on validation, then retrain the chosen lr with every seed.

    Finished runs found in ``store`` are reused (never run again, never replaced); the
    others are run by ``runner`` and recorded as soon as they finish. Returns
    :func:`summarise` of all the records.
    """
    progress = _Progress(plan.total_runs, say, tag)
    records: list[dict] = []

    def fetch(key: RunKey, method: MethodPlan) -> dict:
        settings = run_settings(plan, method)
        record = store.get(key, settings)
        how = "reused"
        if record is None:
            say(f"[{tag}] starting {key.phase} {key.method} lr {key.lr:g} seed {key.seed} "
                f"({key.epochs} epochs)")
            record = store.put(key, settings, runner(key, method))
            how = f"done in {record['outcome'].get('wall_seconds', 0.0):.0f}s"
        progress.report(key, record["outcome"], how)
        records.append(record)
        return record

    for method in plan.methods:
        for lr in method.grid:
            fetch(RunKey("tune", method.method, lr, plan.tune_seed, plan.tune_epochs), method)
    for method in plan.methods:
        tuned = [r for r in records
                 if r["key"]["phase"] == "tune" and r["key"]["method"] == method.method]
        chosen = choose_lr(_grid_entries(tuned), method.default_lr)
        if chosen is None:
            progress.skip(len(plan.seeds), f"{method.method}: no lr of its grid finished")
            continue
        for seed in plan.seeds:
            fetch(RunKey("final", method.method, chosen, seed, plan.epochs), method)
    return summarise(plan, records)


def _grid_entries(tune_records: Sequence[dict]) -> list[dict]:
    entries = []
    for record in tune_records:
        outcome = record["outcome"]
        entries.append({"lr": record["key"]["lr"], "val_mAP": outcome.get("mAP"),
                        "val_precision_at_k": outcome.get("precision_at_k"),
                        "status": outcome["status"], "run": RunKey(**record["key"]).name})
    return sorted(entries, key=lambda e: -e["lr"])


def _failures(outcome: dict, plan: ComparisonPlan) -> list[str]:
    if outcome["status"] != "done":
        return [f"training {outcome['status']}" + (f": {outcome['error']}"
                                                   if outcome.get("error") else "")]
    return training_failures(outcome.get("history", []), outcome.get("ce_chance"),
                             plan.min_loss_drop, plan.ce_margin)


def summarise(plan: ComparisonPlan, records: Sequence[dict]) -> dict:
    """Per method: its lr grid with val mAP, the chosen lr, test mAP / P@k per seed with
    mean and sd, whether it trained (every seed), its rank among the methods that trained,
    and OPQN's paired difference to it; plus every record under ``runs``."""
    by_phase = {phase: [r for r in records if r["key"]["phase"] == phase] for phase in PHASES}
    methods: dict[str, dict] = {}
    for method in plan.methods:
        m = method.method
        grid = _grid_entries([r for r in by_phase["tune"] if r["key"]["method"] == m])
        finals = sorted((r for r in by_phase["final"] if r["key"]["method"] == m),
                        key=lambda r: r["key"]["seed"])
        outcomes = [r["outcome"] for r in finals]
        test_map = [o.get("mAP") for o in outcomes]
        test_pk = [o.get("precision_at_k") for o in outcomes]
        failures = {r["key"]["seed"]: _failures(r["outcome"], plan) for r in finals}
        mean_map, sd_map = mean_sd(test_map)
        mean_pk, sd_pk = mean_sd(test_pk)
        methods[m] = {
            "optimizer": method.optimizer, "default_lr": method.default_lr,
            "lr_grid": grid, "chosen_lr": choose_lr(grid, method.default_lr),
            "seeds": [r["key"]["seed"] for r in finals],
            "test_mAP": test_map, "mean_mAP": mean_map, "sd_mAP": sd_map,
            "test_precision_at_k": test_pk, "mean_precision_at_k": mean_pk,
            "sd_precision_at_k": sd_pk,
            "trained": bool(finals) and mean_map is not None and not any(failures.values()),
            "did_not_train": {str(s): f for s, f in failures.items() if f},
            "runs": [RunKey(**r["key"]).name for r in finals],
        }
        if not finals:
            methods[m]["did_not_train"] = {"all": ["no lr of the grid finished training"]}
    ranked = sorted((m for m in methods if methods[m]["trained"]),
                    key=lambda m: -methods[m]["mean_mAP"])
    for m, entry in methods.items():
        entry["rank"] = ranked.index(m) + 1 if m in ranked else None
    if REFERENCE in methods:
        for metric, values in (("mAP", "test_mAP"), ("precision_at_k", "test_precision_at_k")):
            reference = dict(zip(methods[REFERENCE]["seeds"], methods[REFERENCE][values]))
            for m, entry in methods.items():
                if m != REFERENCE:
                    diff = paired_difference(reference,
                                             dict(zip(entry["seeds"], entry[values])))
                    if not (methods[REFERENCE]["trained"] and entry["trained"]):
                        diff["verdict"] = "not compared: a method did not train"
                    entry.setdefault("paired_difference", {})[metric] = diff
    return {"methods": methods, "runs": list(records)}

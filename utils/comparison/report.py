"""The outputs of ``python -m utils.comparison``: the Markdown table, the JSON, and the PR,
training-loss and validation-mAP figures, all from the table dict (so that they can be
rebuilt from the JSON alone: :func:`write_report`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from models.methods import DEFAULT_METHOD, get_method
from utils.atomic_io import atomic_path, atomic_write_text
from utils.cli.reporting import _jsonable, plot_pr_curves, plt

REFERENCE_NAME = get_method(DEFAULT_METHOD).title
RISING = 0.02  # a validation mAP gain over the grid budget's last third that gets a note


def schedule_text(schedule: dict) -> str:
    """The header's schedule: ``step (lr halved every N epochs)`` or ``cosine to 0`` (with
    its warmup when there is one)."""
    if schedule.get("name") == "cosine":
        warmup = schedule.get("warmup") or 0
        return "cosine to 0" + (f" after {warmup} warmup epochs" if warmup else "")
    return f"step (lr halved every {schedule.get('lr_step')} epochs)"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def mean_sd_text(mean: float | None, sd: float | None) -> str:
    """``71.20 ± 1.31%`` (just ``71.20%`` without an sd: one seed)."""
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}%" if sd is None else f"{100 * mean:.2f} ± {100 * sd:.2f}%"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def difference_text(diff: dict | None) -> str:
    """``+3.10 ± 1.20 [+0.12, +6.08]`` points (mean ± sd [95% interval]); ``—`` for none."""
    if diff is None or diff.get("mean") is None:
        return "—"
    text = f"{100 * diff['mean']:+.2f}"
    if diff.get("sd") is not None:
        text += f" ± {100 * diff['sd']:.2f}"
    if diff.get("ci"):
        text += f" [{100 * diff['ci'][0]:+.2f}, {100 * diff['ci'][1]:+.2f}]"
    return text


def _verdict(diff: dict | None, trained: bool, edges: list[str]) -> str:
    """The verdict cell; ``edges`` names the methods of the pair (OPQN, the method) whose lr
    was chosen at an edge of its grid, which makes the verdict provisional."""
    if diff is None:
        return "—"
    if not trained:
        return "not ranked (did not train)"
    text = f"**{diff['verdict']}**" if diff.get("ci") else f"{diff['verdict']} (one seed)"
    if edges:
        text += f" (provisional: lr of {' and '.join(edges)} at a grid edge)"
    return text


def _pair_edges(table: dict, method: str) -> list[str]:
    """The names of OPQN and ``method`` whose chosen lr is at an edge of its grid."""
    methods = table["methods"]
    return [methods[m]["name"] for m in dict.fromkeys((DEFAULT_METHOD, method))
            if m in methods and grid_edge(methods[m]) is not None]


def precision_text(precision: str | dict[str, str],
                   names: dict[str, str] | None = None) -> str:
    """``precision float32``, or, when the methods train in different precisions (``--amp
    auto`` keeps bf16 for the methods it holds accuracy for), each one's, named by
    ``names``."""
    if isinstance(precision, str):
        return f"precision {precision}"
    names = names or {}
    return "precision per method (" + ", ".join(
        f"{names.get(m, m)} {p}" for m, p in precision.items()) + ")"


def ordered_methods(table: dict) -> list[str]:
    """Ranked methods first (by rank), then those that did not train, in the given order."""
    methods = table["methods"]
    ranked = sorted((m for m in methods if methods[m]["rank"] is not None),
                    key=lambda m: methods[m]["rank"])
    return ranked + [m for m in methods if methods[m]["rank"] is None]


def _val_at_chosen(entry: dict) -> float | None:
    return next((g["val_mAP"] for g in entry["lr_grid"] if g["lr"] == entry["chosen_lr"]),
                None)


def grid_edge(entry: dict) -> str | None:
    """``"highest"`` or ``"lowest"`` when a method's chosen lr is the largest or smallest of
    the rates of its grid that finished (at least two), else None: a choice at the edge
    says the grid may not bracket the best rate."""
    rates = [g["lr"] for g in entry["lr_grid"] if g["status"] == "done"]
    chosen = entry.get("chosen_lr")
    if chosen is None or len(rates) < 2:
        return None
    return "highest" if chosen == max(rates) else "lowest" if chosen == min(rates) else None


def markdown(table: dict) -> str:
    """The comparison as Markdown: a header with the protocol, the main table, the
    validation mAP of every lr tried, and why a method did not train."""
    k = table["k"]
    val = table["validation"]
    names = {m: e["name"] for m, e in table["methods"].items()}
    protocol = ("cross-dataset (-c, unseen identities)" if table["protocol"] == "cross"
                else "standard")
    lines = [
        f"{table['dataset']}, {table['bits']} bits, {protocol} protocol, learning rate "
        f"chosen on validation: {val['per_identity']} training images per identity held out "
        f"as queries ({val['identities']} identities, {val['gallery_images']} gallery and "
        f"{val['query_images']} query images); the test split used once per final model. "
        f"Grid runs {table['tune_epochs']} epochs, final runs {table['epochs']} epochs, "
        f"schedule {schedule_text(table['schedule'])}, the "
        f"same for every method; seeds {', '.join(map(str, table['seeds']))}; "
        f"{precision_text(table['precision'], names)} (--amp {table['amp']}); wall time of "
        f"all runs {_duration(table['wall_seconds'])}.", "", f"`{table['command']}`", "",
        f"| rank | method | code | optimizer, chosen lr (default) | epochs | val mAP "
        f"| test mAP | P@{k} | {REFERENCE_NAME} − method, mAP [95% CI] | verdict on "
        f"{REFERENCE_NAME} | precision | train s/epoch | bytes/item (stored, packed) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in ordered_methods(table):
        e = table["methods"][method]
        diff = e.get("paired_difference", {}).get("mAP")
        verdict = _verdict(diff, e["trained"], _pair_edges(table, method))
        seconds = e.get("train_seconds_per_epoch")
        lr = "n/a" if e["chosen_lr"] is None else f"{e['chosen_lr']:g}"
        lines.append(
            f"| {e['rank'] if e['rank'] is not None else 'did not train'} | {e['name']} | "
            f"{table['bits']} bits ({e.get('code', 'n/a')}) | {e['optimizer']}, {lr} "
            f"({e['default_lr']:g}) | {table['epochs']} | {_pct(_val_at_chosen(e))} | "
            f"{mean_sd_text(e['mean_mAP'], e['sd_mAP'])} | "
            f"{mean_sd_text(e['mean_precision_at_k'], e['sd_precision_at_k'])} | "
            f"{difference_text(diff)} | {verdict} | "
            f"{', '.join(e['precision'])} | {'n/a' if seconds is None else f'{seconds:.1f}'} | "
            f"{e.get('bytes_per_item', 'n/a')}, {e.get('packed_bytes_per_item', 'n/a')} |")
    lines += ["", "Mean ± sample sd over the seeds; the paired difference is taken seed by "
              "seed, in mAP points, with its Student-t 95% interval over the seeds; the "
              "verdict is on OPQN: better (interval above 0), worse (below 0) or no "
              "detectable difference. Validation mAP of every learning rate tried (chosen "
              "in bold):", "",
              "| method | lr: validation mAP |", "| --- | --- |"]
    for method in ordered_methods(table):
        e = table["methods"][method]
        cells = []
        for g in e["lr_grid"]:
            cell = f"{g['lr']:g}: {_pct(g['val_mAP']) if g['status'] == 'done' else g['status']}"
            cells.append(f"**{cell}**" if g["lr"] == e["chosen_lr"] else cell)
        lines.append(f"| {e['name']} | {', '.join(cells)} |")
    rising = [(table["methods"][m]["name"], table["methods"][m]["val_late_gain"])
              for m in ordered_methods(table)
              if (table["methods"][m].get("val_late_gain") or 0) > RISING]
    if rising:
        lines += ["", f"Validation mAP at the chosen lr still rose by more than "
                  f"{100 * RISING:g} points over the last third of the grid budget, so the "
                  f"budget may be too short: " + ", ".join(f"{name} +{100 * gain:.1f}"
                                                            for name, gain in rising) + "."]
    entries = [table["methods"][m] for m in ordered_methods(table)]
    edges = [(e["name"], edge, e["chosen_lr"]) for e in entries
             if (edge := grid_edge(e)) is not None]
    if edges:
        lines += ["", "Chosen at the edge of its grid, so its best rate may lie outside "
                  "the rates tried (widen --sgd-lrs or --adam-lrs): " + ", ".join(
                      f"{name} at its {edge} rate {lr:g}" for name, edge, lr in edges) + "."]
    failed = [(table["methods"][m]["name"], seed, reasons)
              for m in ordered_methods(table)
              for seed, reasons in table["methods"][m]["did_not_train"].items()]
    if failed:
        lines += ["", "Did not train (not ranked):", ""]
        lines += [f"- {name}, seed {seed}: {'; '.join(reasons)}" for name, seed, reasons in failed]
    return "\n".join(lines) + "\n"


def _grid(count: int) -> tuple:
    cols = min(3, max(1, count))
    rows = math.ceil(max(1, count) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110,
                             squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(fig, path: Path) -> Path:
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_losses(table: dict, path: Path) -> Path:
    """Every method's training loss per epoch (chosen lr, first seed), one panel each."""
    methods = ordered_methods(table)
    fig, axes = _grid(len(methods))
    for ax, method in zip(axes, methods):
        e = table["methods"][method]
        curve = e["loss_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="." if len(curve) < 30 else None)
        seed = e["seeds"][0] if e["seeds"] else "-"
        flag = "" if e["trained"] else ", did not train"
        ax.set_title(f"{e['name']} (lr {e['chosen_lr'] if e['chosen_lr'] else 'n/a'}, seed "
                     f"{seed}{flag})", fontsize="small", color="black" if e["trained"] else "red")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{table['dataset']} {table['protocol']}: {table['bits']} bits, training loss",
                 fontsize="medium")
    return _save(fig, path)


def plot_validation(table: dict, path: Path) -> Path:
    """Validation mAP per epoch of every lr of every method's grid (the monitoring
    evaluation of the grid runs): does each budget level off?"""
    methods = ordered_methods(table)
    fig, axes = _grid(len(methods))
    for ax, method in zip(axes, methods):
        e = table["methods"][method]
        for lr, points in e["val_curves"].items():
            if points:
                chosen = e["chosen_lr"] is not None and float(lr) == e["chosen_lr"]
                ax.plot(*zip(*points), label=f"lr {float(lr):g}", linewidth=2.2 if chosen else 1)
        ax.set_title(e["name"], fontsize="small")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation mAP")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"{table['dataset']} {table['protocol']}: validation mAP of the lr grid "
                 f"({table['tune_epochs']} epochs)", fontsize="medium")
    return _save(fig, path)


def write_report(table: dict, stem: Path) -> list[Path]:
    """``stem.json``, ``stem.md``, ``stem_pr.png``, ``stem_loss.png`` and, when the grid
    runs were monitored, ``stem_val.png``; returns the paths written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(_jsonable(table), indent=1) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(table))
    curves = [(f"{e['name']} (mAP {mean_sd_text(e['mean_mAP'], e['sd_mAP'])}"
               f"{'' if e['trained'] else ', did not train'})", e["pr_curve"])
              for e in (table["methods"][m] for m in ordered_methods(table)) if e["pr_curve"]]
    written = [stem.with_suffix(".json"), stem.with_suffix(".md"),
               plot_pr_curves(curves, stem.with_name(stem.name + "_pr.png"),
                              title=f"{table['dataset']}{' -c' if table['protocol'] == 'cross' else ''}"
                                    f": {table['bits']} bits, mean over seeds"),
               plot_losses(table, stem.with_name(stem.name + "_loss.png"))]
    if any(points for e in table["methods"].values() for points in e["val_curves"].values()):
        written.append(plot_validation(table, stem.with_name(stem.name + "_val.png")))
    return written


def write_budget_report(runs: list[dict], args, tag: str, stem: Path,
                        protocol: str = "standard") -> dict:
    """``stem.json``, ``stem.md`` and ``stem.png`` of ``--measure-budget``: every method's
    validation mAP at its default lr (or its ``--budget-lr``) after each budget, and the
    shortest budget after which none gains (:func:`utils.comparison.plan.sufficient_budget`);
    ``runs`` are the budget runs' records, made under ``protocol`` ("standard" or
    "cross"). Returns the JSON's content."""
    from utils.comparison.plan import settled_ranking_budget, sufficient_budget

    scores: dict[str, dict[int, float | None]] = {}
    lrs, curves = {}, {}
    for record in runs:
        key, outcome = record["key"], record["outcome"]
        scores.setdefault(key["method"], {})[key["epochs"]] = outcome.get("mAP")
        lrs[key["method"]] = key["lr"]
        curves[f"{key['method']}_e{key['epochs']}"] = [
            [h["epoch"], h["monitor_mAP"]] for h in outcome.get("history", [])
            if h.get("monitor_mAP") is not None]
    own = {m: sufficient_budget({m: per}, args.max_rise) for m, per in scores.items()}
    budget = sufficient_budget(scores, args.max_rise)
    settled = settled_ranking_budget(scores)
    budgets = sorted({b for per in scores.values() for b in per})
    setting = f"{args.dataset}{', -c protocol' if protocol == 'cross' else ''}, " \
              f"{args.len} bits"
    result = {"dataset": args.dataset, "protocol": protocol, "tag": tag, "bits": args.len,
              "num_books": args.num,
              "budgets": budgets, "max_rise": args.max_rise, "budget": budget,
              "ranking_settled_at": settled,
              "sufficient_alone": own, "lr": lrs,
              "val_mAP": {m: {str(b): v for b, v in per.items()} for m, per in scores.items()},
              "curves": curves, "command": args.command}
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_name(stem.name + ".json"), json.dumps(result, indent=1) + "\n")
    chosen = budget if budget is not None else f"none of {budgets} (still rising)"
    ranked = settled if settled is not None else f"none of {budgets}"
    at = "the lr in the table" if args.budget_lr else "its default lr"
    lines = [f"Validation mAP (precise BN) of every method at {at}, seed 0, after "
             f"each budget (every run with its own full schedule), {setting}. "
             f"Shortest budget after which no method gains "
             f"{100 * args.max_rise:g} point(s) or more: {chosen}. Shortest budget from "
             f"which the methods' order no longer changes: {ranked}.", "",
             f"`{args.command}`", "",
             "| method | lr | " + " | ".join(f"{b} epochs" for b in budgets)
             + " | enough alone |", "| --- | --- | " + " | ".join("---" for _ in budgets)
             + " | --- |"]
    for method, per in scores.items():
        lines.append(f"| {method} | {lrs[method]:g} | "
                     + " | ".join(_pct(per.get(b)) for b in budgets)
                     + f" | {own[method] if own[method] is not None else 'still rising'} |")
    atomic_write_text(stem.with_name(stem.name + ".md"), "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for method, per in scores.items():
        points = sorted((b, v) for b, v in per.items() if v is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{method} (lr {lrs[method]:g})")
    if budget is not None:
        ax.axvline(budget, color="grey", linestyle="--", label=f"budget {budget}")
    ax.set_xlabel("budget (epochs)")
    ax.set_ylabel("validation mAP (precise BN)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title(f"{setting}: validation mAP after each budget",
                 fontsize="medium")
    _save(fig, stem.with_name(stem.name + ".png"))
    return result

"""The study's report: README.md, table.csv and the plots, from the per-run result JSON only.

Rerunning `python -m experiments.study report` regenerates everything from `OUT/results/`; runs
that have no result file yet are listed as missing and the report says it is partial. Every claim is
judged on differences paired by seed (the arms of a seed share init seed and data order), as a mean
with its 95% t interval (df = seeds - 1), against the equivalence margin declared before the runs.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.arms import (
    EQUIVALENCE_MARGIN,
    EXIT_BASELINES,
    PASSES,
    Arm,
    arms,
    continued_lr,
    jobs,
    parameters,
    run_name,
    train_steps,
)
from experiments.pilot import mixture_loss, paired_interval
from training.evaluate import POLICIES

if TYPE_CHECKING:
    from experiments.study import Layout

Results = dict[str, dict[int, dict[str, Any]]]  # arm name -> seed -> result

PAPER = (
    "arXiv 2603.01914 (Pile, 4 passes; tabled in docs/method.md): AdaPonderLM 14.32 PPL at 3.8 passes vs "
    "PonderLM 14.40 (70M from scratch); 9.87 at 3.8 vs 9.72 (410M); continued from PonderLM at 1.4B / "
    "2.8B: equal validation loss at 3.7 / 3.8 passes"
)


def load_results(layout: Layout) -> Results:
    """Every evaluated run by arm and seed. A tuned arm's first seed is its chosen tuning run (the
    lowest final validation loss of the trainer's own evaluation, as the study chose it)."""
    found: Results = {arm.name: {} for arm in arms(layout.scale)}
    for arm, seed in jobs(layout.scale):
        path = layout.result_file(run_name(arm, seed))
        if path.is_file():
            found[arm.name][seed] = json.loads(path.read_text())
    first = layout.scale.seeds[0]
    for arm in arms(layout.scale):
        tuning = [found[name][first] for name in arm.tuned_by if first in found[name]]
        if tuning and len(tuning) == len(arm.tuned_by):
            found[arm.name][first] = min(tuning, key=lambda r: r["trainer_eval"]["lm_loss"])
    return found


# --------------------------------------------------------------------------------------------------
# Per-run numbers.


def _weighted(result: dict[str, Any], key: str) -> float:
    shards = result["shards"].values()
    return sum(s[key] * s["tokens"] for s in shards) / sum(s["tokens"] for s in shards)


def passes(result: dict[str, Any]) -> float:
    return _weighted(result, "mean_passes")


def flops(result: dict[str, Any]) -> float:
    return _weighted(result, "flops_per_token")


def mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def paired(results: Results, a: str, b: str, metric: Callable[[dict[str, Any]], float]) -> list[float]:
    """metric(a) - metric(b) for every seed both arms were evaluated on."""
    return [metric(results[a][s]) - metric(results[b][s]) for s in sorted(results[a]) if s in results[b]]


def fmt_interval(diffs: list[float], digits: int = 4) -> str:
    if not diffs:
        return "not measured yet"
    interval = paired_interval(diffs)
    if interval is None:
        return f"{diffs[0]:+.{digits}f} (one seed)"
    mean, low, high = interval
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] ({len(diffs)} seeds)"


def better(diffs: list[float]) -> str:
    """Verdict on 'a gains over b' from the paired gains: holds when the whole interval is above 0."""
    interval = paired_interval(diffs)
    if interval is None:
        return "undecided: fewer than two seeds"
    _, low, high = interval
    return (
        "holds"
        if low > 0
        else "fails (the interval lies below 0)"
        if high < 0
        else "inconclusive (the interval covers 0)"
    )


def same(diffs: list[float]) -> str:
    """Verdict on 'the same quality': holds when the whole interval lies inside +-margin."""
    interval = paired_interval(diffs)
    if interval is None:
        return "undecided: fewer than two seeds"
    _, low, high = interval
    if -EQUIVALENCE_MARGIN < low and high < EQUIVALENCE_MARGIN:
        return f"holds (inside +-{EQUIVALENCE_MARGIN})"
    if low > EQUIVALENCE_MARGIN or high < -EQUIVALENCE_MARGIN:
        return f"fails (outside +-{EQUIVALENCE_MARGIN})"
    return f"inconclusive (crosses +-{EQUIVALENCE_MARGIN})"


# --------------------------------------------------------------------------------------------------
# Tables.


def summary_rows(layout: Layout, results: Results) -> list[dict[str, Any]]:
    vanilla = [flops(r) for r in results.get("vanilla", {}).values()]
    base = float(np.mean(vanilla)) if vanilla else math.nan
    rows = []
    for arm in arms(layout.scale):
        runs = list(results[arm.name].values())
        if arm.tuned_by and not runs:
            continue
        rows.append(
            {
                "arm": arm.name,
                "label": arm.label,
                "seeds": len(runs),
                "parameters": runs[0]["parameters"] if runs else None,
                "train_tokens": runs[0]["train_tokens"] if runs else None,
                "code": [r["shards"]["code"]["loss"] for r in runs],
                "programs": [r["shards"]["programs"]["loss"] for r in runs if "programs" in r["shards"]],
                "mixture": [mixture_loss(r) for r in runs],
                "passes": [passes(r) for r in runs],
                "flops_vs_vanilla": [flops(r) / base for r in runs],
                "wall": [r["train_wall_seconds"] for r in runs],
            }
        )
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = [
        "arm",
        "seeds",
        "parameters",
        "train_tokens",
        "code",
        "programs",
        "mixture",
        "passes",
        "flops_vs_vanilla",
        "wall",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow(
                [
                    f"{np.mean(row[k]):.6f}"
                    if isinstance(row[k], list) and row[k]
                    else ""
                    if isinstance(row[k], list)
                    else row[k]
                    for k in fields
                ]
            )


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| arm | seeds | parameters | train tokens | code loss | programs loss | mixture loss "
        "| passes / token "
        "| inference FLOPs / token (x vanilla) | train wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops_x = f"{np.mean(r['flops_vs_vanilla']):.2f}" if r["flops_vs_vanilla"] else "n/a"
        wall = f"{np.mean(r['wall']):.0f}" if r["wall"] else "n/a"
        params = f"{r['parameters']:,}" if r["parameters"] else "n/a"
        tokens = f"{r['train_tokens']:,}" if r["train_tokens"] else "n/a"
        lines.append(
            f"| {r['label']} | {r['seeds']} | {params} | {tokens} | {mean_sd(r['code'])} "
            f"| {mean_sd(r['programs'])} "
            f"| {mean_sd(r['mixture'])} | {mean_sd(r['passes'])} | {flops_x} | {wall} |"
        )
    return lines


def _draw_mean(fixed: dict[str, Any], key: str) -> float:
    return float(np.mean([d[key] for d in fixed["draws"]]))


def _fixed_key(fixed: dict[str, Any]) -> tuple[float, str, bool]:
    return fixed["tau"], fixed["policy"], fixed["gate_scaling"]


def _pair(result: dict[str, Any], key: tuple[float, str, bool]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The learned point at tau and the fixed-pruning point `key` of one adaptive run's sweep."""
    sweep = result["sweep"]
    learned = next(p for p in sweep["learned"] if p["tau"] == key[0])
    return learned, next(f for f in sweep["fixed"] if _fixed_key(f) == key)


def pruning_rows(results: Results, scale_arms: list[Arm]) -> list[dict[str, Any]]:
    """Per adaptive arm, tau and fixed policy (gates' scaling kept or neutralised): the fixed policy's
    loss (mean of its draws) minus the learned policy's at the same mean passes, paired by seed."""
    rows = []
    for arm in [a for a in scale_arms if a.adaptive and results[a.name]]:
        runs = list(results[arm.name].values())
        for key in [_fixed_key(f) for f in runs[0]["sweep"]["fixed"]]:
            pairs = [_pair(r, key) for r in runs]
            rows.append(
                {
                    "arm": arm.name,
                    "tau": key[0],
                    "policy": key[1],
                    "scaling": "kept" if key[2] else "neutralised",
                    "passes": float(np.mean([learned["mean_passes"] for learned, _ in pairs])),
                    "gains": [_draw_mean(fixed, "loss") - learned["loss"] for learned, fixed in pairs],
                    "spread": float(np.mean([np.std([d["loss"] for d in f["draws"]]) for _, f in pairs])),
                }
            )
    return rows


def pruning_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| arm | tau | passes | fixed policy | gates' scaling | fixed - learned (nats) "
        "| verdict (learned better) | sd over draws |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['tau']:g} | {r['passes']:.3f} | {r['policy']} | {r['scaling']} | "
            f"{fmt_interval(r['gains'])} | {better(r['gains'])} | {r['spread']:.4f} |"
        )
    return lines


def curve_at(points: list[tuple[float, float]], x: float) -> float | None:
    """Loss of a (FLOPs, loss) curve at `x` by linear interpolation; None outside its range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def baseline_curves(result: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """A plain PonderLM run's training-free curves on the sweep set, each ending at its full model:
    fixed pruning by policy (means of the draws) and the confidence exit."""
    sweep = result["sweep"]
    full = (sweep["trained"]["flops_per_token"], sweep["trained"]["loss"])
    curves = {
        policy: [
            (_draw_mean(f, "flops_per_token"), _draw_mean(f, "loss"))
            for f in sweep["fixed"]
            if f["policy"] == policy
        ]
        + [full]
        for policy in sorted({f["policy"] for f in sweep["fixed"]})
    }
    curves["confidence"] = [(p["flops_per_token"], p["loss"]) for p in sweep["confidence"]] + [full]
    return curves


def exit_rows(results: Results) -> list[dict[str, Any]]:
    """At each learned point's FLOPs: the baseline's interpolated loss minus the learned loss, by seed."""
    rows = []
    for arm, base in EXIT_BASELINES.items():
        seeds = [s for s in results.get(arm, {}) if s in results.get(base, {})]
        if not seeds:
            continue
        for i, learned in enumerate(results[arm][seeds[0]]["sweep"]["learned"]):
            for name in baseline_curves(results[base][seeds[0]]):
                gains = []
                for s in seeds:
                    point = results[arm][s]["sweep"]["learned"][i]
                    at = curve_at(baseline_curves(results[base][s])[name], point["flops_per_token"])
                    if at is not None:
                        gains.append(at - point["loss"])
                rows.append(
                    {"arm": arm, "baseline": base, "exit": name, "tau": learned["tau"], "gains": gains}
                )
    return rows


def fixed_depth_gap(results: Results, arm: str, fixed: str) -> list[float]:
    """By seed: a trained fixed-depth arm's sweep-set loss minus `arm`'s tau sweep interpolated at
    its FLOPs (seeds where that lies outside the sweep are left out)."""
    gains = []
    for seed, result in results.get(arm, {}).items():
        if seed in results.get(fixed, {}):
            point = results[fixed][seed]["sweep"]["trained"]
            curve = [(p["flops_per_token"], p["loss"]) for p in result["sweep"]["learned"]]
            at = curve_at(curve, point["flops_per_token"])
            if at is not None:
                gains.append(point["loss"] - at)
    return gains


def exit_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| adaptive arm | tau | baseline (training-free exit) | baseline - learned at equal FLOPs (nats) "
        "| verdict (learned better) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = better(r["gains"]) if r["gains"] else "outside the baseline's FLOPs range"
        lines.append(
            f"| {r['arm']} | {r['tau']:g} | {r['baseline']}, {r['exit']} | {fmt_interval(r['gains'])} "
            f"| {verdict} |"
        )
    return lines


def depth_rows(results: Results, scale_arms: list[Arm]) -> list[dict[str, Any]]:
    """NLL by learned exit depth on the code and programs shards, as halted and with every pass forced."""
    rows = []
    for arm in [a for a in scale_arms if a.adaptive and results[a.name]]:
        for shard in ("code", "programs"):
            runs = [r for r in results[arm.name].values() if shard in r["shards"]]
            for j in range(1, PASSES + 1):
                cells = [
                    next((d for d in r["shards"][shard]["forced_by_learned_depth"] if d["passes"] == j), None)
                    for r in runs
                ]
                cells = [c for c in cells if c is not None]
                if cells:
                    rows.append(
                        {
                            "arm": arm.name,
                            "shard": shard,
                            "passes": j,
                            "share": float(np.mean([c["share"] for c in cells])),
                            "learned": float(np.mean([c["nll_learned"] for c in cells])),
                            "forced": float(np.mean([c["nll_forced"] for c in cells])),
                            "seeds": len(cells),
                        }
                    )
    return rows


def depth_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| arm | shard | learned exit after pass | share of tokens | NLL as halted "
        "| NLL with every pass forced | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['shard']} | {r['passes']} | {100 * r['share']:.1f}% | {r['learned']:.4f} "
            f"| {r['forced']:.4f} | {r['seeds']} |"
        )
    return lines


def hard_token_gap(result: dict[str, Any], shard: str) -> float | None:
    """Forced NLL of the tokens that ran every pass minus that of the tokens that stopped earlier,
    pooled over the earlier exits by their shares (one exit depth may hold a handful of tokens)."""
    cells = result["shards"][shard]["forced_by_learned_depth"]
    last = [c for c in cells if c["passes"] == result["num_passes"]]
    early = [c for c in cells if c["passes"] < result["num_passes"] and c["share"] > 0]
    if not last or not early:
        return None
    weight = sum(c["share"] for c in early)
    return last[0]["nll_forced"] - sum(c["share"] * c["nll_forced"] for c in early) / weight


def task_table(layout: Layout, results: Results) -> list[str]:
    tasks = sorted({t for runs in results.values() for r in runs.values() for t in r.get("tasks", {})})
    if not tasks:
        return []
    lines = [
        "| arm | " + " | ".join(f"{t} accuracy | {t} passes" for t in tasks) + " |",
        "|---|" + "---|---|" * len(tasks),
    ]
    for arm in arms(layout.scale):
        runs = [r for r in results[arm.name].values() if "tasks" in r]
        if not runs:
            continue
        cells = []
        for t in tasks:
            cells.append(mean_sd([r["tasks"][t]["acc"] for r in runs]))
            cells.append(f"{np.mean([r['tasks'][t]['mean_passes'] for r in runs]):.3f}")
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------------
# Claims.


def claims(
    layout: Layout, results: Results, prune: list[dict[str, Any]], exits: list[dict[str, Any]]
) -> list[str]:
    lines = [
        f"Paper: {PAPER}.",
        "",
        "Losses are the validation mixture (code and programs, whole shards, weighted by tokens), in nats; "
        "each verdict reads the paired 95% interval over seeds.",
        "",
        "| claim | paired difference (nats) | verdict |",
        "|---|---|---|",
    ]
    rows = [
        (
            f"Pondering pays: PonderLM K={PASSES} beats vanilla (vanilla - PonderLM)",
            "vanilla",
            "ponderlm",
            better,
        ),
        (
            "... more than the same FLOPs spent on depth (deep vanilla - PonderLM)",
            "vanilla-deep",
            "ponderlm",
            better,
        ),
        ("Each pass adds: K=2 over vanilla", "vanilla", "ponderlm-k2", better),
        ("K=3 over K=2", "ponderlm-k2", "ponderlm-k3", better),
        ("K=4 over K=3", "ponderlm-k3", "ponderlm", better),
        (
            "AdaPonderLM from scratch keeps PonderLM's quality (AdaPonderLM - PonderLM)",
            "adaponder",
            "ponderlm",
            same,
        ),
        (
            "AdaPonderLM continued keeps its PonderLM's quality (adaponder-cont - ponderlm-more)",
            "adaponder-cont",
            "ponderlm-more",
            same,
        ),
    ]
    for text, a, b, verdict in rows:
        diffs = paired(results, a, b, mixture_loss)
        lines.append(f"| {text} | {fmt_interval(diffs)} | {verdict(diffs)} |")
    for arm, base in EXIT_BASELINES.items():
        saved = paired(results, base, arm, passes)
        text = f"{arm} runs fewer passes than {base} ({base} - {arm}, passes per token)"
        lines.append(f"| {text} | {fmt_interval(saved, 3)} | {better(saved)} |")
    for k in (2, 3):
        gains = fixed_depth_gap(results, "adaponder", f"ponderlm-k{k}")
        text = (
            f"AdaPonderLM's learned halting beats a trained PonderLM K={k} at its FLOPs (K={k} - the "
            "tau sweep interpolated there, sweep set)"
        )
        measured = results.get(f"ponderlm-k{k}") and results.get("adaponder")
        verdict = better(gains) if gains or not measured else "outside the tau sweep's FLOPs range"
        lines.append(f"| {text} | {fmt_interval(gains)} | {verdict} |")
    for arm in EXIT_BASELINES:
        for shard in ("code", "programs"):
            runs = results.get(arm, {}).values()
            hard = [h for r in runs if shard in r["shards"] and (h := hard_token_gap(r, shard)) is not None]
            text = (
                "Tokens that run every pass are the hard ones: NLL with every pass forced, all-pass "
                f"tokens - tokens that exited earlier ({arm}, {shard})"
            )
            lines.append(f"| {text} | {fmt_interval(hard)} | {better(hard)} |")
    init = paired(results, "ponderlm-pythia-init", "ponderlm", mixture_loss)
    lines += [
        "",
        f"Init (one seed, no verdict): PonderLM K={PASSES} with Pythia's init minus PonderLM's init: "
        f"{fmt_interval(init)}.",
        "",
        "Learned halting against fixed pruning at the same passes (sweep set), per tau: "
        + _count(prune)
        + "; against PonderLM's training-free exits at the same FLOPs: "
        + _count(exits)
        + " (tables below).",
    ]
    return lines


def _count(rows: list[dict[str, Any]]) -> str:
    verdicts = [better(r["gains"]) for r in rows if len(r["gains"]) > 1]
    if not verdicts:
        return "not measured on two seeds yet"
    holds = sum(v == "holds" for v in verdicts)
    fails = sum(v.startswith("fails") for v in verdicts)
    rest = len(verdicts) - holds - fails
    return (
        f"learned better in {holds} of {len(verdicts)} comparisons, worse in {fails}, inconclusive in {rest}"
    )


# --------------------------------------------------------------------------------------------------
# Plots.


@contextmanager
def _figure(path: Path, size: tuple[float, float], legend_size: int = 8, **legend: Any) -> Iterator[Any]:
    """Axes of a new figure; on leaving, a legend (`legend`: where) when anything is labelled, then
    saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size, **legend)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _mean_point(
    runs: list[dict[str, Any]], pick: Callable[[dict[str, Any]], tuple[float, float]]
) -> tuple[float, float]:
    xs, ys = zip(*(pick(r) for r in runs))
    return float(np.mean(xs)), float(np.mean(ys))


POLICY_MARKERS = {"uniform": "^", "geometric": "v", "confidence": "D"}


def plot_compute(layout: Layout, results: Results, path: Path) -> None:
    """Loss against inference FLOPs per token on the sweep set, means over seeds: every trained
    fixed-depth model (a square), every adaptive tau sweep (solid), fixed pruning of it (dotted:
    the gates' scaling kept; dashed: neutralised) and PonderLM's training-free exits (dash-dot).
    One colour per arm; the marker tells the exit policy."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    vanilla = list(results.get("vanilla", {}).values())
    base = float(np.mean([r["sweep"]["trained"]["flops_per_token"] for r in vanilla])) if vanilla else 1.0

    def line(
        ax: Any, curve: list[tuple[float, float]], style: str, colour: Any, label: str, **kw: Any
    ) -> None:
        curve = sorted(curve)
        ax.plot([x / base for x, _ in curve], [y for _, y in curve], style, color=colour, label=label, **kw)

    # Two dozen curves: the legend goes beside the axes.
    with _figure(path, (12, 6), legend_size=7, loc="upper left", bbox_to_anchor=(1.01, 1.0)) as ax:
        for i, arm in enumerate(arms(layout.scale)):
            runs = list(results[arm.name].values())
            if not runs or arm.name.startswith(
                "vanilla-deep-"
            ):  # tuning runs: the chosen one is vanilla-deep
                continue
            colour, sweep0 = colours[(2 * i) % len(colours)], runs[0]["sweep"]
            if arm.adaptive:
                n = len(sweep0["learned"])
                learned = [_mean_point(runs, lambda r, j=j: _xy(r["sweep"]["learned"][j])) for j in range(n)]
                line(ax, learned, "o-", colour, f"{arm.name}: learned, tau sweep", lw=2)
                for policy in POLICIES:
                    for scaling in (True, False):
                        keys = [
                            j
                            for j, f in enumerate(sweep0["fixed"])
                            if (f["policy"], f["gate_scaling"]) == (policy, scaling)
                        ]
                        curve = [
                            _mean_point(runs, lambda r, j=j: _draw_xy(r["sweep"]["fixed"][j])) for j in keys
                        ]
                        style = POLICY_MARKERS[policy] + (":" if scaling else "--")
                        kept = "kept" if scaling else "neutralised"
                        line(
                            ax,
                            curve,
                            style,
                            colour,
                            f"{arm.name}: {policy} pruning, scaling {kept}",
                            lw=1,
                            ms=4,
                        )
                continue
            x, y = _mean_point(runs, lambda r: _xy(r["sweep"]["trained"]))
            ax.plot([x / base], [y], "s", ms=8, color=colour, label=f"{arm.name} (K={runs[0]['num_passes']})")
            if "confidence" in sweep0:
                for name in baseline_curves(runs[0]):
                    curves = [sorted(baseline_curves(r)[name]) for r in runs]
                    mean = list(
                        zip(
                            np.mean([[p[0] for p in c] for c in curves], axis=0),
                            np.mean([[p[1] for p in c] for c in curves], axis=0),
                        )
                    )
                    line(
                        ax, mean, POLICY_MARKERS[name] + "-.", colour, f"{arm.name}: {name} exit", lw=1, ms=4
                    )
        ax.set_xlabel("inference FLOPs per token (x vanilla K=1)")
        ax.set_ylabel("validation loss, sweep set (nats per token)")
        ax.set_title("Loss against inference compute (means over seeds)")
        ax.grid(alpha=0.3)


def _xy(p: dict[str, Any]) -> tuple[float, float]:
    return p["flops_per_token"], p["loss"]


def _draw_xy(fixed: dict[str, Any]) -> tuple[float, float]:
    return _draw_mean(fixed, "flops_per_token"), _draw_mean(fixed, "loss")


def plot_depth(layout: Layout, rows: list[dict[str, Any]], path: Path) -> None:
    """NLL by learned exit depth (code shard): as halted and with every pass forced."""
    with _figure(path, (7, 4.5), loc="upper left") as ax:
        for arm in sorted({r["arm"] for r in rows}):
            mine = [r for r in rows if r["arm"] == arm and r["shard"] == "code"]
            xs = [r["passes"] for r in mine]
            ax.plot(xs, [r["forced"] for r in mine], "o-", label=f"{arm}: every pass forced")
            ax.plot(xs, [r["learned"] for r in mine], "x--", label=f"{arm}: as halted")
        ax.set_xticks(range(1, PASSES + 1))
        ax.set_xlabel("passes the learned policy ran (exit depth)")
        ax.set_ylabel("mean NLL (nats per token)")
        ax.set_title("Which tokens run longer: NLL by learned exit depth (code)")
        ax.grid(alpha=0.3)


def plot_gates(layout: Layout, results: Results, path: Path) -> None:
    """Mean gate value of each update during training (TensorBoard histograms), adaptive arms' first
    seed, with the end of stage 1 (ponder loss off before it) and of a continued arm's gates-only
    phase (backbone frozen before it)."""
    with _figure(path, (8, 4.5), loc="lower left") as ax:
        for arm in [a for a in arms(layout.scale) if a.adaptive and results[a.name]]:
            result = results[arm.name][min(results[arm.name])]
            curve = result["training_curve"]
            for u in range(PASSES - 1):
                points = curve.get(f"gate_mean_{u}", [])
                if points:
                    ax.plot(
                        [s for s, _ in points],
                        [v for _, v in points],
                        lw=1.2,
                        label=f"{arm.name}: gate after pass {u + 1}",
                    )
            if not arm.continues:
                ax.axvline(layout.scale.stage1, color="grey", ls=":", lw=1)
            elif arm.ponder.get("gates_only"):
                ax.axvline(arm.ponder["gates_only"], color="grey", ls="--", lw=1)
        ax.set_xlabel("training step (continued arm: steps since its start)")
        ax.set_ylabel("mean gate value s")
        ax.set_title(
            f"Gates during training (dotted: end of stage 1, step {layout.scale.stage1};\n"
            "dashed: end of the continued arm's gates-only phase)"
        )
        ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------------------
# README.


def _missing(layout: Layout) -> list[str]:
    from experiments.study import locked, run_trained

    missing = []
    for arm, seed in jobs(layout.scale):
        name = run_name(arm, seed)
        if layout.result_file(name).is_file():
            continue
        latest = layout.run_dir(name) / "checkpoints" / "latest"
        if run_trained(layout, arm, seed):
            missing.append(f"{name} (trained, not evaluated)")
        elif locked(layout.run_dir(name)):
            missing.append(f"{name} (training now)")
        elif latest.is_file():
            missing.append(f"{name} (stopped at {latest.read_text().strip()}; resumes there)")
        else:
            missing.append(f"{name} (not started)")
    return missing


def reproduction(layout: Layout) -> list[str]:
    """The section on the rerun from scratch, when one was compared (`study compare`)."""
    from experiments.reproduce import reproduced, table

    path = layout.results / "reproduction.json"
    if not path.is_file():
        return []
    comparison = json.loads(path.read_text())
    runs = comparison["runs"]
    same_runs = sum(r["verdict"] == "same" for r in runs)
    return [
        "## Reproduction from scratch",
        "",
        f"The study was run again from an empty work directory for {len(runs)} runs "
        f"(`{comparison['rerun']}`): corpus, tokenizer and shards rebuilt ({comparison['data']} as this "
        "study's, sha256 in `results/corpus.json`), then every run trained and evaluated, and each "
        "result compared with this study's over every number but timings. Resumed: how often the run's "
        "trainer continued from a checkpoint after a stop or a kill.",
        "",
        *table(comparison),
        "",
        f"{same_runs} of {len(runs)} runs reproduce to a relative 1e-6 or better; "
        + (
            "none lies outside the seed spread."
            if reproduced(comparison)
            else "**some lie outside the seed spread: the study does not reproduce.**"
        ),
        "",
    ]


def _setup(layout: Layout) -> list[str]:
    s = layout.scale
    corpus_file = layout.results / "corpus.json"
    corpus = json.loads(corpus_file.read_text()) if corpus_file.is_file() else {}
    tokens = {
        k: f"{v['tokens']:,}" if isinstance(v, dict) and v.get("tokens") else "n/a" for k, v in corpus.items()
    }
    m = s.model
    continued = next((a for a in arms(s) if a.continues), None)
    return [
        f"- Corpus: Python sources of installed packages, split by package (train: "
        f"{', '.join(corpus.get('train', {}).get('packages', []))}; validation: "
        f"{', '.join(corpus.get('valid', {}).get('packages', []))}, never trained on), plus generated "
        f"multi-step programs (`experiments/corpus.py`; {s.synthetic_train_bytes / 1e6:.2g} MB for training, "
        f"a held-out shard from another generator seed). Tokens: train {tokens.get('train', 'n/a')}, "
        f"validation code {tokens.get('valid', 'n/a')}, "
        f"validation programs {tokens.get('valid_synthetic', 'n/a')}. "
        f"Byte-level BPE with {s.vocab_size} tokens trained on the training split.",
        "- Model: Pythia-shaped (GPT-NeoX, parallel residual, rotary 0.25), "
        f"{m['num_hidden_layers']} layers, "
        f"hidden {m['hidden_size']}, {m['num_attention_heads']} heads, MLP {m['intermediate_size']}; "
        "PonderLM's init unless the arm says otherwise.",
        f"- Training from scratch: {s.train_steps} steps x {s.batch_size} x {s.seq_len} tokens = "
        f"{s.tokens:,} tokens, AdamW lr {s.lr:g} (warmup {s.warmup}, cosine to 0.1x), fp32, DeepSpeed "
        f"ZeRO-3 on 1 rank, `training/pretrain.py`, one process per run; adaptive arms: stage 1 "
        f"{s.stage1} steps without the ponder loss, then k rising over {s.ramp} steps; seeds "
        f"{', '.join(map(str, s.seeds))} (init and data order; every arm of a seed reads the same tokens).",
        (
            f"- Continued arms: {train_steps(continued, s)} more steps from their seed's "
            f"`{continued.continues}` (exported after its last step), reading the samples that follow the "
            f"ones it read, peak lr {continued_lr(s):g} (warmup {s.warmup}, cosine to 0.1x)."
            if continued
            else ""
        ),
        f"- Evaluation (`experiments/evaluate.py`, through `adaponder-eval`'s Python API): main numbers on "
        f"{'every non-overlapping window' if not s.eval_windows else f'{s.eval_windows} windows'} of "
        f"{s.seq_len} tokens of each validation shard at the trained tau; the compute curves on a sweep set "
        f"of {s.sweep_windows} windows spread over both shards by tokens: tau "
        f"{', '.join(f'{t:g}' for t in s.taus)} for adaptive arms, with uniform and geometric fixed pruning "
        f"at each tau's mean passes ({s.draws} random draws, the gates' scaling kept and neutralised); on "
        f"plain PonderLM fixed pruning at {', '.join(f'{p:g}' for p in s.pass_grid)} mean passes "
        f"({s.draws} draws) and the confidence exit at {', '.join(f'{c:g}' for c in s.confidences)}. "
        "FLOPs per token from the model's own count.",
        "- Arms: " + "; ".join(f"`{a.name}`: {a.label}" for a in arms(s)) + ".",
    ]


HEADER = """# The paper's claims at small scale

Generated by `python -m experiments.study report` from the files under `{results}`; do not edit by
hand (the study rewrites it).

    python -m experiments.study run --background   # start or resume (log: {work}/study.log)
    python -m experiments.study status             # which runs are trained / evaluated
    python -m experiments.study report             # regenerate this file and the plots
    python -m experiments.study run --smoke        # toy size, as tests/test_experiments.py runs it
    python -m experiments.study run --seeds 1 --work experiments/work/rerun   # seed 1 again, from scratch
    python -m experiments.study compare --rerun experiments/work/rerun        # "Reproduction" below

The command resumes where it stopped: evaluated runs are skipped, trained runs are only evaluated,
interrupted runs continue from their last checkpoint (every {interval} steps); a continued arm waits
for its source run, a tuned arm for its tuning runs. Run state (corpus, checkpoints, logs) is under
`{work}` (git-ignored).

The regime was chosen by a pilot before these runs ([pilot 1](pilot/README.md) failed the decision
rule, [pilot 2](pilot2/README.md) passed it): {tokens_per_param:.0f} tokens per parameter, a backbone
too shallow for the generated programs. The vanilla and PonderLM K=4 runs of seeds 1 and 2 are pilot
2's own runs, carried over: the same configs (the study checks them) and the same data bytes.

## Declared before the runs

- Equivalence margin: "the same quality" holds only if the 95% paired t interval (df = seeds - 1) of
  the validation-loss difference lies inside +-{margin} nats; an interval that crosses it is
  inconclusive.
- Every comparison is paired by seed and reported as the mean difference with its t interval.
"""


def write_report(layout: Layout) -> Path:
    layout.results.mkdir(parents=True, exist_ok=True)
    scale_arms = arms(layout.scale)
    results = load_results(layout)
    rows = summary_rows(layout, results)
    prune = pruning_rows(results, scale_arms)
    exits = exit_rows(results)
    depth = depth_rows(results, scale_arms)
    write_csv(rows, layout.results / "table.csv")
    plot_compute(layout, results, layout.results / "ppl_vs_compute.png")
    plot_depth(layout, depth, layout.results / "nll_by_depth.png")
    plot_gates(layout, results, layout.results / "gates_in_training.png")
    missing = _missing(layout)
    rel = layout.results.relative_to(layout.out)
    lines = [
        HEADER.format(
            results=rel,
            work=layout.shown(layout.work),
            interval=layout.scale.checkpoint_interval,
            tokens_per_param=layout.scale.tokens / parameters(layout.scale.name),
            margin=EQUIVALENCE_MARGIN,
        )
    ]
    if missing:
        lines += [
            f"**PARTIAL RESULTS: {len(missing)} of {len(jobs(layout.scale))} runs have no result yet; every "
            "number below covers only the evaluated runs.** Missing:",
            "",
            *[f"- {m}" for m in missing],
            "",
        ]
    walls = [w for r in rows for w in r["wall"]]
    lines += [
        "## Setup",
        "",
        *[line for line in _setup(layout) if line],
        "",
        "## Results",
        "",
        *main_table(rows),
        "",
        f"Training wall time per run on 1 core, 2 runs at a time on this machine's 2 cores; total over "
        f"the evaluated runs {sum(walls) / 3600:.2f} core-hours.",
        "",
        "## Which claims hold here",
        "",
        *claims(layout, results, prune, exits),
        "",
        f"![loss against inference compute]({rel}/ppl_vs_compute.png)",
        "",
        "### Learned halting against fixed pruning of the same model (sweep set; positive: fixed is worse)",
        "",
        *pruning_table(prune),
        "",
        "### Learned halting against PonderLM's training-free exits at equal FLOPs",
        "",
        *exit_table(exits),
        "",
        "### Which tokens run longer",
        "",
        *depth_table(depth),
        "",
        f"![NLL by learned exit depth]({rel}/nll_by_depth.png)",
        "",
        "### Gates during training",
        "",
        f"![gate values during training]({rel}/gates_in_training.png)",
        "",
        "### Downstream tasks (lm-eval, multiple choice by log-likelihood)",
        "",
        *(task_table(layout, results) or ["not measured yet"]),
        "",
        *reproduction(layout),
    ]
    path = layout.out / "README.md"
    path.write_text("\n".join(lines))
    return path

"""The study's report: README.md, table.csv and the two plots, from the per-run result JSON only.

Rerunning `python -m experiments.study report` regenerates everything from `OUT/results/`; runs
that have no result file yet are listed as missing and the report says it is partial.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.arms import PASSES, Arm, arms, run_name

if TYPE_CHECKING:
    from experiments.study import Layout

PAPER = (
    "arXiv 2603.01914 (Pile, 4 passes; tabled in docs/method.md): AdaPonderLM 14.32 PPL at 3.8 passes vs "
    "PonderLM 14.40 (70M); "
    "9.87 at 3.8 vs 9.72 (410M); continued 1.4B / 2.8B: equal validation loss at 3.7 / 3.8 passes"
)


def load_results(layout: Layout) -> dict[str, list[dict[str, Any]]]:
    """Arm name -> result dicts of its evaluated seeds (in seed order)."""
    by_arm: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms(layout.scale)}
    for seed in layout.scale.seeds:
        for arm in arms(layout.scale):
            path = layout.result_file(run_name(arm, seed))
            if path.is_file():
                by_arm[arm.name].append(json.loads(path.read_text()))
    return by_arm


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def pm(values: list[float], fmt: str = ".3f") -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{fmt}}" if math.isnan(std) else f"{mean:{fmt}} ± {std:{fmt}}"


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a minus mean of b and its standard error from the seed spreads (nan if unknown)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b)) if a and b else math.nan
    return ma - mb, se


def paired(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """Per-seed differences a - b: mean, standard error, how many are positive."""
    d = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(d)
    return mean, std / math.sqrt(len(d)) if len(d) > 1 else math.nan, sum(x > 0 for x in d)


def verdict(delta: float, se: float, better_if_negative: bool = True) -> str:
    if math.isnan(delta):
        return "not measured yet"
    if math.isnan(se):
        return "one seed only: no spread to judge against"
    if abs(delta) < 2 * se:
        return "no difference beyond 2 standard errors"
    return "better" if (delta < 0) == better_if_negative else "worse"


# --------------------------------------------------------------------------------------------------
# Tables.


def summary_rows(layout: Layout, by_arm: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    vanilla = by_arm.get("vanilla") or []
    base_inf = np.mean([r["learned"]["flops_per_token"] for r in vanilla]) if vanilla else math.nan
    base_train = np.mean([r["learned"]["dense_flops_per_token"] for r in vanilla]) if vanilla else math.nan
    rows = []
    for arm in arms(layout.scale):
        results = by_arm[arm.name]
        learned = [r["learned"] for r in results]
        rows.append(
            {
                "arm": arm.name,
                "label": arm.label,
                "seeds": len(results),
                "ppl": [x["ppl"] for x in learned],
                "passes": [x["mean_passes"] for x in learned],
                # Training runs every pass of every token densely (ZeRO-3 keeps the ranks in step).
                "train_flops": np.mean([x["dense_flops_per_token"] for x in learned]) / base_train
                if learned
                else math.nan,
                "inference_flops": np.mean([x["flops_per_token"] for x in learned]) / base_inf
                if learned
                else math.nan,
                "wall": [r["train_wall_seconds"] for r in results],
                "params": results[0]["parameters"] if results else None,
            }
        )
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "arm",
                "seeds",
                "ppl_mean",
                "ppl_std",
                "mean_passes",
                "train_flops_rel",
                "inference_flops_rel",
                "wall_s",
            ]
        )
        for r in rows:
            ppl, std = mean_std(r["ppl"])
            w.writerow(
                [
                    r["arm"],
                    r["seeds"],
                    f"{ppl:.4f}",
                    f"{std:.4f}",
                    f"{np.mean(r['passes']) if r['passes'] else math.nan:.4f}",
                    f"{r['train_flops']:.4f}",
                    f"{r['inference_flops']:.4f}",
                    f"{np.mean(r['wall']) if r['wall'] else math.nan:.0f}",
                ]
            )


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| arm | seeds | parameters | validation PPL (mean ± std) | passes / token | train FLOPs / token "
        "(x vanilla) | inference FLOPs / token (x vanilla) | train wall s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['params'] or 'n/a':,} | {pm(r['ppl'], '.2f')} "
            f"| {pm(r['passes'])} | {r['train_flops']:.2f} | {r['inference_flops']:.2f} "
            f"| {pm(r['wall'], '.0f')} |"
            if r["seeds"]
            else f"| {r['label']} | 0 | n/a | n/a | n/a | n/a | n/a | n/a |"
        )
    return lines


def pruning_rows(layout: Layout, by_arm: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per adaptive arm and pruning tau: learned and fixed-pruning losses of every seed."""
    rows = []
    for arm in [a for a in arms(layout.scale) if a.adaptive and by_arm[a.name]]:
        for i, tau in enumerate(p["tau"] for p in by_arm[arm.name][0]["tau_sweep"]):
            points = [r["tau_sweep"][i] for r in by_arm[arm.name]]
            if not all("fixed_pruning" in p for p in points):
                continue
            rows.append(
                {
                    "arm": arm.name,
                    "tau": tau,
                    "passes": [p["mean_passes"] for p in points],
                    "learned": [p["loss"] for p in points],
                    **{
                        name: [p["fixed_pruning"][name]["loss"] for p in points]
                        for name in ("uniform", "geometric")
                    },
                    **{
                        f"{name}_passes": [p["fixed_pruning"][name]["mean_passes"] for p in points]
                        for name in ("uniform", "geometric")
                    },
                }
            )
    return rows


def pruning_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| arm | tau | passes (learned / uniform / geometric) | learned loss | uniform - learned "
        "| geometric - learned | seeds where learned wins (uniform, geometric) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        wins = []
        for name in ("uniform", "geometric"):
            mean, se, positive = paired(r[name], r["learned"])
            cells.append(f"{mean:+.4f}" + ("" if math.isnan(se) else f" (se {se:.4f})"))
            wins.append(f"{positive}/{len(r['learned'])}")
        passes = " / ".join(f"{np.mean(r[k]):.3f}" for k in ("passes", "uniform_passes", "geometric_passes"))
        lines.append(
            f"| {r['arm']} | {r['tau']:g} | {passes} | {pm(r['learned'], '.4f')} | {cells[0]} | {cells[1]} "
            f"| {', '.join(wins)} |"
        )
    return lines


def sweep_table(layout: Layout, by_arm: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| arm | tau | passes / token | PPL (mean ± std) |", "|---|---|---|---|"]
    for arm in [a for a in arms(layout.scale) if a.adaptive and by_arm[a.name]]:
        for i, point in enumerate(by_arm[arm.name][0]["tau_sweep"]):
            points = [r["tau_sweep"][i] for r in by_arm[arm.name]]
            lines.append(
                f"| {arm.name} | {point['tau']:g} | {pm([p['mean_passes'] for p in points])} "
                f"| {pm([p['ppl'] for p in points], '.2f')} |"
            )
    return lines


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
        _drop_overlapping_labels(ax)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _drop_overlapping_labels(ax: Any) -> None:
    """Removes each annotation that would overlap an earlier one or the legend (curves that nearly
    coincide would otherwise print their labels on top of each other)."""
    renderer = ax.figure.canvas.get_renderer()
    legend = ax.get_legend()
    kept = [legend.get_window_extent(renderer)] if legend is not None else []
    for text in list(ax.texts):
        box = text.get_window_extent(renderer)
        if any(box.overlaps(other) for other in kept):
            text.remove()
        else:
            kept.append(box)


def plot_compute(layout: Layout, by_arm: dict[str, list[dict[str, Any]]], path: Path) -> None:
    vanilla = by_arm.get("vanilla") or []
    base = np.mean([r["learned"]["flops_per_token"] for r in vanilla]) if vanilla else None
    # The legend (a dozen entries) stands right of the axes, off the points.
    with _figure(path, (11, 5.5), legend_size=7, loc="center left", bbox_to_anchor=(1.01, 0.5)) as ax:
        _plot_compute(layout, by_arm, ax, base)


def _plot_compute(
    layout: Layout, by_arm: dict[str, list[dict[str, Any]]], ax: Any, base: float | None
) -> None:
    def x_of(flops: list[float]) -> float:
        return float(np.mean(flops)) / base if base else float(np.mean(flops))

    for i, arm in enumerate(arms(layout.scale)):
        results = by_arm[arm.name]
        if not results:
            continue
        color = f"C{i}"
        ppl = [r["learned"]["ppl"] for r in results]
        ax.errorbar(
            x_of([r["learned"]["flops_per_token"] for r in results]),
            np.mean(ppl),
            yerr=np.std(ppl, ddof=1) if len(ppl) > 1 else None,
            fmt="o",
            color=color,
            label=arm.label,
            capsize=3,
        )
        if not arm.adaptive:
            continue
        sweep = results[0]["tau_sweep"]
        xs = [x_of([r["tau_sweep"][j]["flops_per_token"] for r in results]) for j in range(len(sweep))]
        ys = [np.mean([r["tau_sweep"][j]["ppl"] for r in results]) for j in range(len(sweep))]
        ax.plot(xs, ys, "-", color=color, alpha=0.6)
        for x, y, point in zip(xs, ys, sweep):
            ax.annotate(
                f"τ={point['tau']:g}",
                (x, y),
                fontsize=7,
                color=color,
                xytext=(3, 3),
                textcoords="offset points",
            )
        pruned = [j for j, point in enumerate(sweep) if "fixed_pruning" in point]
        for j in pruned:
            for name, marker in (("uniform", "s"), ("geometric", "^")):
                fx = x_of([r["tau_sweep"][j]["fixed_pruning"][name]["flops_per_token"] for r in results])
                fy = np.mean([r["tau_sweep"][j]["fixed_pruning"][name]["ppl"] for r in results])
                ax.plot(
                    fx,
                    fy,
                    marker,
                    mfc="none",
                    color=color,
                    label=f"{arm.name}: {name} exits" if j == pruned[0] else None,
                )
    ax.set_xlabel("inference FLOPs per token (x vanilla K=1)" if base else "inference FLOPs per token")
    ax.set_ylabel("validation perplexity (held-out packages)")
    ax.set_title("Perplexity against inference compute (mean over seeds; lines: tau sweep)")
    ax.grid(alpha=0.3)


def plot_nll_by_passes(layout: Layout, by_arm: dict[str, list[dict[str, Any]]], path: Path) -> None:
    adaptive = [a for a in arms(layout.scale) if a.adaptive and by_arm[a.name]]
    # The legend sits in a row above the bars, in headroom kept free for it (see _plot_nll_by_passes).
    with _figure(path, (7.5, 4.8), loc="upper center", ncol=max(1, len(adaptive))) as ax:
        _plot_nll_by_passes(layout, by_arm, ax)


def share_label(share: float) -> str:
    """A share of tokens as a bar label: "<1%" rather than a misleading "0%" for a few tokens."""
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


def nll_by_passes_bars(layout: Layout, by_arm: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """What nll_by_passes.png draws: per adaptive arm, one bar per pass count that some token of some
    seed ran (NLL averaged over the seeds whose tokens ran it; share of tokens averaged over all
    seeds). A pass count no token ran has no bar."""
    out = []
    for arm in [a for a in arms(layout.scale) if a.adaptive and by_arm[a.name]]:
        results = by_arm[arm.name]
        nll = np.array(
            [[math.nan if v is None else v for v in r["learned"]["nll_by_passes"]] for r in results]
        )
        share = np.mean([r["learned"]["share_by_passes"] for r in results], axis=0)
        counts = np.isfinite(nll).sum(axis=0)
        bars = [
            (j + 1, float(np.nansum(nll[:, j]) / counts[j]), float(share[j]))
            for j in range(PASSES)
            if counts[j] > 0 and share[j] > 0
        ]
        out.append({"arm": arm.name, "bars": bars})
    return out


def _plot_nll_by_passes(layout: Layout, by_arm: dict[str, list[dict[str, Any]]], ax: Any) -> None:
    groups = nll_by_passes_bars(layout, by_arm)
    width = 0.8 / max(1, len(groups))
    top = 0.0
    for i, group in enumerate(groups):
        offset = (i - (len(groups) - 1) / 2) * width
        xs = [passes + offset for passes, _, _ in group["bars"]]
        ys = [nll for _, nll, _ in group["bars"]]
        ax.bar(xs, ys, width, label=group["arm"], color=f"C{3 + i}")
        for x, y, (_, _, share) in zip(xs, ys, group["bars"]):
            ax.annotate(
                share_label(share), (x, y), ha="center", fontsize=7, xytext=(0, 2), textcoords="offset points"
            )
        top = max([top, *ys])
    ax.set_xticks(range(1, PASSES + 1))
    ax.set_xlim(0.5, PASSES + 0.5)
    ax.set_ylim(0, top * 1.3 if top else 1.0)
    ax.set_xlabel("passes the token ran (learned halting at the trained tau; no bar: no token)")
    ax.set_ylabel("mean NLL (nats per token)")
    ax.set_title(
        "Validation NLL of tokens by the passes they ran (mean over seeds)\nbar labels: share of tokens"
    )


def _curve_at(curve: list[list[float]], step: int) -> float:
    """The logged value at the last logged step <= `step` (nan if none)."""
    before = [v for s, v in curve if s <= step]
    return before[-1] if before else math.nan


def stage1_rows(layout: Layout, by_arm: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per adaptive arm: training mean passes at the end of stage 1 and at the end, and the mean
    ponder loss once it was on: the mean of the lowest k of the gate values, near 0 when a fraction
    k_max of them already sits at 0 (the gates closed on their own) and the loss has nothing to do."""
    s0 = layout.scale.stage1
    rows = []
    for arm in [a for a in arms(layout.scale) if a.adaptive]:
        curves = [r["training_curve"] for r in by_arm[arm.name] if "training_curve" in r]
        if not curves:
            continue
        after = [[v for s, v in c["ponder_loss"] if s > s0] for c in curves]
        rows.append(
            {
                "arm": arm.name,
                "seeds": len(curves),
                "at_s0": [_curve_at(c["mean_passes"], s0) for c in curves],
                "final": [c["mean_passes"][-1][1] for c in curves],
                "ponder_loss": [float(np.mean(a)) if a else math.nan for a in after],
                "first_halting": [
                    next((s for s, v in c["mean_passes"] if v < PASSES - 0.01), math.nan) for c in curves
                ],
            }
        )
    return rows


def stage1_table(layout: Layout, rows: list[dict[str, Any]]) -> list[str]:
    s0 = layout.scale.stage1
    lines = [
        f"| arm | seeds | first logged step with passes < {PASSES - 0.01:g} | training passes at step {s0} "
        "(end of stage 1) | training passes at the end | mean ponder loss after stage 1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['seeds']} | {pm(r['first_halting'], '.0f')} | {pm(r['at_s0'])} | "
            f"{pm(r['final'])} | {pm(r['ponder_loss'], '.2e')} |"
        )
    return lines


def plot_training_passes(layout: Layout, by_arm: dict[str, list[dict[str, Any]]], path: Path) -> None:
    with _figure(path, (7, 4.5)) as ax:
        _plot_training_passes(layout, by_arm, ax)


def _plot_training_passes(layout: Layout, by_arm: dict[str, list[dict[str, Any]]], ax: Any) -> None:
    for i, arm in enumerate(arms(layout.scale)):
        curves = [r["training_curve"]["mean_passes"] for r in by_arm[arm.name] if "training_curve" in r]
        if not arm.adaptive or not curves:
            continue
        steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
        means = [np.mean([dict(map(tuple, c))[s] for c in curves]) for s in steps]
        ax.plot(steps, means, color=f"C{i}", label=f"{arm.name} ({len(curves)} seeds)")
    s0, s1 = layout.scale.stage1, layout.scale.stage1 + layout.scale.ramp
    ax.axvline(s0, color="gray", ls="--", lw=0.8)
    ax.axvline(s1, color="gray", ls=":", lw=0.8)
    ax.set_xlabel(f"training step (dashed: ponder loss starts, S0 = {s0}; dotted: k reaches k_max)")
    ax.set_ylabel("mean passes per token (training batches)")
    ax.set_title("When the gates start halting (mean over seeds)")
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------------------
# Claims.


def _equal_passes_loss(results: list[dict[str, Any]], passes: float) -> list[float]:
    """Each seed's loss on its tau-sweep curve, interpolated at `passes` (nan outside the curve)."""
    out = []
    for r in results:
        pts = sorted((p["mean_passes"], p["loss"]) for p in r["tau_sweep"])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        out.append(float(np.interp(passes, xs, ys)) if xs[0] <= passes <= xs[-1] else math.nan)
    return out


def _overlap_differences(
    results: list[dict[str, Any]], baseline: list[dict[str, Any]], points: int = 11
) -> list[tuple[float, float, float]]:
    """Per seed of both arms whose tau-sweep curves (loss against mean passes) overlap: the overlap
    [lo, hi] and the mean over it (`points` evenly spaced passes) of results' loss - baseline's."""
    by_seed = {r["seed"]: r for r in baseline}
    out = []
    for r in results:
        if r["seed"] not in by_seed:
            continue
        pair = (r, by_seed[r["seed"]])
        curves = [sorted((p["mean_passes"], p["loss"]) for p in x["tau_sweep"]) for x in pair]
        lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
        if lo > hi:
            continue
        grid = np.linspace(lo, hi, points)
        ours, theirs = (np.interp(grid, [x for x, _ in c], [y for _, y in c]) for c in curves)
        out.append((lo, hi, float(np.mean(ours - theirs))))
    return out


def claims(layout: Layout, by_arm: dict[str, list[dict[str, Any]]], prune: list[dict[str, Any]]) -> list[str]:
    ppl = {name: [r["learned"]["ppl"] for r in res] for name, res in by_arm.items()}
    passes = {name: [r["learned"]["mean_passes"] for r in res] for name, res in by_arm.items()}
    lines = []

    def compare(a: str, b: str, what: str) -> str:
        delta, se = difference(ppl[a], ppl[b])
        if math.isnan(delta):
            return f"- {what}: not measured yet ({a}: {len(ppl[a])} seeds, {b}: {len(ppl[b])} seeds)."
        return (
            f"- {what}: {a} {pm(ppl[a], '.2f')} vs {b} {pm(ppl[b], '.2f')} PPL, difference "
            f"{delta:+.2f} (se {se:.2f}): {a} is {verdict(delta, se)}."
        )

    lines.append("**Pondering itself (PonderLM's claim).**")
    lines.append(compare("ponderlm", "vanilla", "PonderLM K=4 against vanilla K=1"))
    lines.append(
        compare("ponderlm", "vanilla-deep", "PonderLM K=4 against a deeper vanilla model of the same FLOPs")
    )
    lines.append("")
    lines.append(
        "**AdaPonderLM keeps PonderLM's quality with fewer passes** (paper: within ~0.1 PPL at 3.7-3.8 of "
        "4 passes)."
    )
    for name in ("adaponder", "adaponder-k0.3", "adaponder-hold"):
        lines.append(compare(name, "ponderlm", f"{name} at {pm(passes[name])} passes per token"))
    lines.append("")
    lines.append("**(a) Learned halting beats fixed pruning at the same mean passes** (paired by seed).")
    if not prune:
        lines.append("- not measured yet.")
    for r in prune:
        parts = []
        for name in ("uniform", "geometric"):
            mean, se, positive = paired(r[name], r["learned"])
            parts.append(
                f"{name} exits lose {mean:+.4f} nats (se {se:.4f}; learned better on "
                f"{positive}/{len(r['learned'])} seeds: {verdict(-mean, se)})"
            )
        lines.append(
            f"- {r['arm']} at tau {r['tau']:g} ({np.mean(r['passes']):.2f} passes): " + "; ".join(parts) + "."
        )
    lines.append("")
    lines.append("**(b) Tokens that halt early are the easy ones** (NLL by passes run, mean over seeds).")
    for arm in [a for a in arms(layout.scale) if a.adaptive]:
        results = by_arm[arm.name]
        if not results:
            lines.append(f"- {arm.name}: not measured yet.")
            continue
        share = np.mean([r["learned"]["share_by_passes"] for r in results], axis=0)
        nll = [[v for v in r["learned"]["nll_by_passes"]] for r in results]
        cells = []
        for j in range(PASSES):
            values = [n[j] for n in nll if n[j] is not None]
            cells.append(f"{j + 1}: {np.mean(values):.3f} ({share[j]:.1%})" if values else f"{j + 1}: none")
        early = next((j for j in range(PASSES - 1) if share[j] >= 0.01), None)
        if early is None:
            judged = "fewer than 1% of tokens halt before the last pass: nothing to compare"
        else:
            e = np.mean([n[early] for n in nll if n[early] is not None])
            last = np.mean([n[-1] for n in nll if n[-1] is not None])
            judged = f"holds ({e:.3f} < {last:.3f})" if e < last else f"does not hold ({e:.3f} >= {last:.3f})"
        lines.append(f"- {arm.name}: NLL (share) by passes {'; '.join(cells)}; {judged}.")
    lines.append("")
    lines.append(
        "**Stage 1: gate learning rate x0.1 (`adaponder`) against halting held off in stage 1 with gates at "
        "x1 (`adaponder-hold`)**, compared at equal passes on each seed's tau-sweep curve."
    )
    a, h = by_arm["adaponder"], by_arm["adaponder-hold"]
    compared = False
    # At each arm's trained mean passes, where the other arm's tau-sweep curves reach it too.
    for at_arm in ("adaponder", "adaponder-hold") if a and h else ():
        at = float(np.mean(passes[at_arm]))
        la = [x for x in _equal_passes_loss(a, at) if not math.isnan(x)]
        lh = [x for x in _equal_passes_loss(h, at) if not math.isnan(x)]
        if not la or not lh:
            continue
        compared = True
        delta, se = difference(lh, la)
        lines.append(
            f"- at {at:.3f} passes ({at_arm}'s trained mean; curves of {len(lh)} hold / {len(la)} multiplier "
            f"seeds reach it): hold {pm(lh, '.4f')} vs multiplier {pm(la, '.4f')} nats, difference "
            f"{delta:+.4f} (se {se:.4f}): holding halting off is {verdict(delta, se)}."
        )
    overlaps = _overlap_differences(h, a)
    if overlaps:
        compared = True
        deltas = [d for _, _, d in overlaps]
        mean, se, worse = paired(deltas, [0.0] * len(deltas))
        cells = ", ".join(f"{d:+.4f} ({lo:.2f}-{hi:.2f} passes)" for lo, hi, d in overlaps)
        lines.append(
            f"- paired by seed, averaged over the passes both of a seed's curves reach: hold - multiplier "
            f"{cells}; mean {mean:+.4f} nats (se {se:.4f}), hold worse on {worse}/{len(deltas)} seeds: "
            f"holding halting off is {verdict(mean, se)}."
        )
    if a and h and not compared:
        lines.append("- the arms' tau-sweep curves share no trained mean passes: no equal-passes comparison.")
    elif not compared:
        lines.append("- not measured yet.")
    for r in stage1_rows(layout, by_arm):
        lines.append(
            f"- {r['arm']}: {pm(r['at_s0'])} passes at the end of stage 1 (step {layout.scale.stage1}); the "
            f"mean ponder loss after it was {pm(r['ponder_loss'], '.2e')} "
            + (
                "(the gates had closed on their own before the ponder loss started)."
                if np.nanmean(r["at_s0"]) < PASSES - 0.05
                else "(the gates were still open when the ponder loss started)."
            )
        )
    lines.append(
        "- The default stays `optimizer.gate_lr_multiplier: 0.1` with `ponder.halt_during_stage1: true` "
        "unless holding halting off is better here by more than 2 standard errors over 3 seeds."
    )
    lines.append("")
    lines.append(f"Paper numbers for comparison: {PAPER}.")
    return lines


# --------------------------------------------------------------------------------------------------


def _missing(layout: Layout) -> list[str]:
    from experiments.study import locked, trained

    missing = []
    for seed in layout.scale.seeds:
        for arm in arms(layout.scale):
            name = run_name(arm, seed)
            if layout.result_file(name).is_file():
                continue
            latest = layout.run_dir(name) / "checkpoints" / "latest"
            if trained(layout.run_dir(name), layout.scale):
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
    same = sum(r["verdict"] == "same" for r in runs)
    return [
        "## Reproduction from scratch",
        "",
        f"The study was run again from an empty work directory for {len(runs)} runs "
        f"(`{comparison['rerun']}`; commands at the top of `experiments/study.py`): corpus, tokenizer "
        f"and shards rebuilt ({comparison['data']} as this study's, sha256 in `results/corpus.json`), "
        "then every run trained and evaluated. Each run's result is compared with this study's over "
        "every number it holds but timings (tau sweep, fixed pruning, NLL by passes, training curve). "
        "Resumed: how often the run's trainer continued from a checkpoint after a stop or a kill (its "
        "log's `resumed from` lines). Checkpoints taken between two logged steps carry the logging "
        "interval since 2026-12-01; a run resumed from one before that logs, at the first logged step "
        "after the resume, the mean of the steps since the resume only.",
        "",
        *table(comparison),
        "",
        f"{same} of {len(runs)} runs reproduce to a relative 1e-6 or better; "
        + (
            "none lies outside the seed spread."
            if reproduced(comparison)
            else "**some lie outside the seed spread: the study does not reproduce.**"
        ),
        "",
    ]


def _setup(layout: Layout, arm_list: list[Arm]) -> list[str]:
    s = layout.scale
    corpus_file = layout.results / "corpus.json"
    corpus = json.loads(corpus_file.read_text()) if corpus_file.is_file() else {}
    tokens = {k: f"{v['tokens']:,}" if v.get("tokens") else "n/a" for k, v in corpus.items()}
    m = s.model
    return [
        f"- Corpus: Python sources of installed packages, split by package. Train: "
        f"{', '.join(corpus.get('train', {}).get('packages', []))} "
        f"({tokens.get('train', 'n/a')} tokens); "
        f"validation: {', '.join(corpus.get('valid', {}).get('packages', []))} "
        f"({tokens.get('valid', 'n/a')} tokens, packages never seen in training). Byte-level BPE with "
        f"{s.vocab_size} tokens trained on the train split.",
        "- Model: Pythia-shaped (GPT-NeoX, parallel residual, rotary 0.25), "
        f"{m['num_hidden_layers']} layers, "
        f"hidden {m['hidden_size']}, {m['num_attention_heads']} heads, MLP {m['intermediate_size']}; "
        f"K={PASSES} for the pondering arms.",
        f"- Training: {s.train_steps} steps x {s.batch_size} x {s.seq_len} tokens = {s.tokens:,} tokens, "
        f"AdamW lr {s.lr:g} (warmup {s.warmup}, cosine to 0.1x), fp32, DeepSpeed ZeRO-3, 1 rank, "
        f"`training/pretrain.py`, one process per run; stage 1 {s.stage1} steps (no ponder loss), "
        f"k ramp {s.ramp} steps; seeds {', '.join(map(str, s.seeds))} (init and data order); every arm "
        f"of a seed reads the same tokens.",
        f"- Evaluation: {s.eval_windows} windows of {s.seq_len} tokens evenly spaced over the validation "
        f"shard, fp32; tau sweep {', '.join(f'{t:g}' for t in s.taus)}; fixed pruning (uniform, geometric "
        f"exit depths through `exit_passes`) matched to the learned mean passes at every tau, all through "
        "`adaponder-eval`'s Python API (training/evaluate.py). FLOPs per token from the model's own count "
        f"(`out.flops`); training FLOPs are the dense forward (every pass of every token, as trained).",
        "- Arms: " + "; ".join(f"`{a.name}`: {a.label}" for a in arm_list) + ".",
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
interrupted runs continue from their last checkpoint (every {interval} steps). Run state (corpus,
checkpoints, logs) is under `{work}` (git-ignored).

This study's regime (0.56 tokens per parameter, training loss still falling) is too small to judge
pondering by. The regime pilots choose the next one: [pilot 1](pilot/README.md),
[pilot 2](pilot2/README.md).
"""

SIZING = """
Sizing (full study): single-thread training throughput measured on this 2-core machine while it was
nearly idle (load ~1; 8 x 256-token batches, 20 steps): vanilla 5,100 tokens/s, PonderLM K=4 1,150,
a 16-layer vanilla 1,450. At {tokens:,} tokens per run that is about 3.5 min for `vanilla`,
15 min for each K=4 arm and ~25 min for the 30-layer `vanilla-deep` (extrapolated), so ~75 min of
one core per seed and ~2 h for 3 seeds with 2 runs at a time, plus a few minutes of evaluation per
adaptive run; the study's 4-sample batches are somewhat slower per token than the 8 measured.
The wall times in the table are what the runs took here (niced, on a machine shared with other
jobs), so they are upper bounds. Measured in the study's own runs, two side by side on the 2 cores:
the K=4 arms train at 700-750 tokens/s (about 23 min a run), the 30-layer vanilla takes about 33
min, an adaptive run's evaluation about 2 min (one thread): about 70 min of wall time per seed, so
3.5 h for the whole study rather than the 2 h this sizing aimed at.
"""


def write_report(layout: Layout) -> Path:
    layout.results.mkdir(parents=True, exist_ok=True)
    arm_list = arms(layout.scale)
    by_arm = load_results(layout)
    rows = summary_rows(layout, by_arm)
    prune = pruning_rows(layout, by_arm)
    write_csv(rows, layout.results / "table.csv")
    plot_compute(layout, by_arm, layout.results / "ppl_vs_compute.png")
    plot_nll_by_passes(layout, by_arm, layout.results / "nll_by_passes.png")
    plot_training_passes(layout, by_arm, layout.results / "training_passes.png")
    missing = _missing(layout)
    rel = layout.results.relative_to(layout.out)
    lines = [
        HEADER.format(
            results=rel,
            work=layout.shown(layout.work),
            interval=layout.scale.checkpoint_interval,
            tokens=layout.scale.tokens,
        )
    ]
    if layout.scale.name == "full":
        lines.append(SIZING.format(tokens=layout.scale.tokens))
    if missing:
        lines += [
            f"**PARTIAL RESULTS: {len(missing)} of {len(arm_list) * len(layout.scale.seeds)} runs have no "
            "result yet; every number below covers only the evaluated seeds.** Missing:",
            "",
            *[f"- {m}" for m in missing],
            "",
        ]
    walls = [w for r in rows for w in r["wall"]]
    lines += [
        "## Setup",
        "",
        *_setup(layout, arm_list),
        "",
        "## Results",
        "",
        *main_table(rows),
        "",
        f"Wall time: training seconds per run on 1 core (runs trained {2} at a time on this machine's 2 "
        f"cores); total over the evaluated runs {sum(walls) / 3600:.2f} core-hours of training.",
        "",
        f"![perplexity against inference compute]({rel}/ppl_vs_compute.png)",
        "",
        f"![NLL by passes run]({rel}/nll_by_passes.png)",
        "",
        "### Learned halting against fixed pruning (loss in nats; positive: the fixed policy is worse)",
        "",
        *pruning_table(prune),
        "",
        "### Stage 1: when the gates start halting (training batches, from the TensorBoard logs)",
        "",
        *stage1_table(layout, stage1_rows(layout, by_arm)),
        "",
        f"![training mean passes]({rel}/training_passes.png)",
        "",
        "### Tau sweep",
        "",
        *sweep_table(layout, by_arm),
        "",
        "## Which claims hold here",
        "",
        *claims(layout, by_arm, prune),
        "",
        *reproduction(layout),
    ]
    path = layout.out / "README.md"
    path.write_text("\n".join(lines))
    return path

"""The regime pilot's report: does pondering pay at this scale? (experiments/pilot/README.md)

    python -m experiments.study run --scale pilot --arms vanilla,ponderlm --background
    python -m experiments.study report --scale pilot          # and the same with --scale pilot2

The study goes on only in a regime where PonderLM K=4 beats vanilla by at least `DECISION_NATS`
paired by seed (same init seed, same data order) on the pilot's validation mixture. The report is
written from the result files alone, whatever they show.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from experiments.arms import EQUIVALENCE_MARGIN, PILOTS, arms, run_name

DECISION_NATS = 0.05
ARMS = ("vanilla", "ponderlm")
# Two-sided 95% quantiles of Student's t for df = 1 .. 10.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired_interval(differences: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95% t interval (df = n - 1) of paired differences; None below two pairs."""
    if len(differences) < 2:
        return None
    mean = statistics.fmean(differences)
    half = T975[len(differences) - 2] * statistics.stdev(differences) / len(differences) ** 0.5
    return mean, mean - half, mean + half


def mixture_loss(result: dict[str, Any]) -> float:
    """Token-weighted loss over both validation shards (their sizes keep the training split's share)."""
    shards = result["shards"].values()
    return sum(s["loss"] * s["tokens"] for s in shards) / sum(s["tokens"] for s in shards)


def _late_drop(result: dict[str, Any]) -> float | None:
    """Training LM loss at 80% of the run minus at its end: how much it was still falling."""
    curve = result.get("training_curve", {}).get("lm_loss", [])
    if len(curve) < 5:
        return None
    end = curve[-1][0]
    at80 = min(curve, key=lambda point: abs(point[0] - 0.8 * end))
    return at80[1] - curve[-1][1]


def load(layout) -> dict[tuple[str, int], dict[str, Any]]:
    found = {}
    for seed in layout.scale.seeds:
        for arm in ARMS:
            path = layout.result_file(run_name(next(a for a in arms(layout.scale) if a.name == arm), seed))
            if path.is_file():
                found[arm, seed] = json.loads(path.read_text())
    return found


def _fmt(interval: tuple[float, float, float] | None, single: list[float]) -> str:
    if interval is None:
        return f"{single[0]:+.4f} (one seed)" if single else "n/a"
    mean, low, high = interval
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def write_pilot_report(layout) -> Path:
    scale = layout.scale
    results = load(layout)
    layout.results.mkdir(parents=True, exist_ok=True)
    rows = [
        "| run | parameters | train tokens | tokens / parameter | code loss | programs loss | mixture loss "
        "| LM loss drop over the last 20% | train s | tokens / s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (arm, seed), r in sorted(results.items(), key=lambda item: (item[0][1], ARMS.index(item[0][0]))):
        drop = _late_drop(r)
        rows.append(
            f"| {arm}-s{seed} | {r['parameters']:,} | {r['train_tokens']:,} | "
            f"{r['train_tokens'] / r['parameters']:.2f} | {r['shards']['code']['loss']:.4f} | "
            f"{r['shards']['programs']['loss']:.4f} | {mixture_loss(r):.4f} | "
            f"{'n/a' if drop is None else f'{drop:.4f}'} | {r['train_wall_seconds']:.0f} | "
            f"{r['train_tokens_per_sec']:.0f} |"
        )
    seeds = [s for s in scale.seeds if all((a, s) in results for a in ARMS)]
    losses = {
        "code": lambda r: r["shards"]["code"]["loss"],
        "programs": lambda r: r["shards"]["programs"]["loss"],
        "mixture": mixture_loss,
    }
    gains = {
        name: [loss(results["vanilla", s]) - loss(results["ponderlm", s]) for s in seeds]
        for name, loss in losses.items()
    }
    summary = {name: paired_interval(values) for name, values in gains.items()}
    mixture = gains["mixture"]
    if not mixture:
        verdict = "No seed has both arms evaluated yet."
    else:
        passed = statistics.fmean(mixture) >= DECISION_NATS and all(g > 0 for g in mixture)
        # A seed with no gain decides the rule; a pass needs every seed of the scale.
        decided = not passed or len(mixture) == len(scale.seeds)
        outcome = ("PASSES" if passed else "FAILS") if decided else "PASSES SO FAR (not decided)"
        verdict = (
            f"{outcome}: PonderLM's paired gain on the mixture is "
            f"{statistics.fmean(mixture):+.4f} nats over {len(mixture)} seed(s) "
            f"({', '.join(f'{g:+.4f}' for g in mixture)}); the rule asks for a mean of at least "
            f"{DECISION_NATS} nats with every seed positive, over seeds {', '.join(map(str, scale.seeds))}."
        )
    walls = {arm: [r["train_wall_seconds"] for (a, _), r in results.items() if a == arm] for arm in ARMS}
    cost = ", ".join(f"{arm} {statistics.fmean(w) / 60:.0f} min" for arm, w in walls.items() if w)
    lines = [
        f"# Regime pilot {PILOTS.index(scale.name) + 1}: does pondering pay at this scale?",
        "",
        f"Generated by `python -m experiments.study report --scale {scale.name}` from `results/`; do not "
        "edit by hand. The regimes tried: "
        + ", ".join(f"[{i + 1}](../{name}/README.md)" for i, name in enumerate(PILOTS))
        + ".",
        "",
        f"    python -m experiments.study run --scale {scale.name} --arms vanilla,ponderlm --background",
        "",
        f"Decision rule, fixed before the runs: the study goes on in this regime only if PonderLM K=4 "
        f"beats vanilla by at least {DECISION_NATS} nats of validation loss, paired by seed (same init "
        "seed and data order), on the validation mixture, with every seed's difference positive.",
        "",
        "## Setup",
        "",
        f"- Model: Pythia-shaped, {scale.model['num_hidden_layers']} layers, hidden "
        f"{scale.model['hidden_size']}, vocabulary {scale.vocab_size} (byte-level BPE on the training "
        "split), PonderLM's init; vanilla K=1 against PonderLM K=4 (same weights shape).",
        f"- Training: {scale.train_steps} steps x {scale.batch_size} x {scale.seq_len} tokens = "
        f"{scale.tokens:,} tokens, AdamW lr {scale.lr} (warmup {scale.warmup}, cosine to 0.1x), fp32, "
        f"DeepSpeed ZeRO-3 on 1 rank; seeds {', '.join(map(str, scale.seeds))}.",
        f"- Corpus: the study's Python sources ({scale.train_bytes / 1e6:.0f} MB of training packages) "
        f"plus {scale.synthetic_train_bytes / 1e6:.0f} MB of generated multi-step programs "
        "(`experiments/corpus.py`: chains of integer assignments ending in an assert, whose values need "
        "every step above them).",
        "- Validation: every non-overlapping window of the code shard (packages never trained on) and of a "
        "held-out programs shard (another generator seed); the mixture weights them by tokens, the "
        "training split's share.",
        "",
        "## Runs",
        "",
        *rows,
        "",
        "## Paired gain of PonderLM over vanilla (nats; mean and 95% t interval, df = seeds - 1)",
        "",
        "| validation | gain |",
        "|---|---|",
        *(f"| {name} | {_fmt(summary[name], gains[name])} |" for name in gains),
        "",
        f"**Verdict: {verdict}**",
        "",
        f"Cost per run measured here (training, niced, beside other work on 2 cores): {cost or 'n/a'}.",
        "",
        "## Declared before the study's runs",
        "",
        f'- Equivalence margin: a claim of "the same quality" holds only if the 95% paired t interval '
        f"(df = seeds - 1) of the validation-loss difference lies inside +-{EQUIVALENCE_MARGIN} nats "
        "(about 2% of perplexity); an interval that crosses the margin is reported as inconclusive.",
        "- Every comparison is paired by seed (all arms of a seed share init seed and data order) and "
        "reported as the mean difference with its t interval; no claim rests on unpaired standard "
        "errors or on a count of seeds.",
        "",
    ]
    out = layout.out / "README.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out

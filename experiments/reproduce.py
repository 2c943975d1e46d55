"""Does a rerun of the study reproduce its results? (`python -m experiments.study compare --rerun DIR`)

A rerun is the study run again from scratch in a fresh work directory (corpus, tokenizer, shards,
training, evaluation), usually on fewer seeds to save time. Each of its runs is compared with the
same run (arm and seed) of the reference study, over every number the evaluation wrote except the
timings. Runs on one core are deterministic, and the trainer's resume is exact, so a run should
reproduce to rounding, whether or not either side was interrupted; the verdict is also given against
the reference's seed spread, the issue's criterion.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from experiments.pilot import mixture_loss
from experiments.report import passes

TIMINGS = ("train_wall_seconds", "train_tokens_per_sec", "eval_wall_seconds")
SAME = 1e-6  # relative: "the same run" (fp32 evaluation sums in one order on one core)


def numbers(value: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a result, by its path ("shards.code.loss", "sweep.trained.2.mean_passes",
    "training_curve.lm_loss.step 350", ...)."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, sub in value.items():
            if key not in TIMINGS:
                out |= numbers(sub, f"{prefix}{key}.")
        return out
    if isinstance(value, list) and value and all(isinstance(v, list) and len(v) == 2 for v in value):
        return {f"{prefix}step {int(step)}": float(v) for step, v in value}  # a training curve
    if isinstance(value, list):
        out = {}
        for i, sub in enumerate(value):
            out |= numbers(sub, f"{prefix}{i}.")
        return out
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {}
    return {prefix.rstrip("."): float(value)}


def largest_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, float]:
    """The field where two results differ most (relative), and by how much; inf if their fields differ."""
    na, nb = numbers(a), numbers(b)
    if na.keys() != nb.keys():
        return f"fields differ: {sorted(na.keys() ^ nb.keys())[:3]}", math.inf
    worst, field = 0.0, ""
    for key, x in na.items():
        y = nb[key]
        if math.isnan(x) and math.isnan(y):
            continue
        d = abs(x - y) / max(abs(x), abs(y), 1e-12)
        if not d <= worst:  # nan on one side only counts as a difference
            worst, field = (math.inf if math.isnan(d) else d), key
    return field, worst


def compare(reference: Path, rerun: Path) -> dict[str, Any]:
    """Compare the runs of `rerun`'s results with the same runs of `reference`'s (both OUT/results)."""
    ref_runs = {p.stem: json.loads(p.read_text()) for p in sorted((reference / "by_run").glob("*.json"))}
    new_runs = {p.stem: json.loads(p.read_text()) for p in sorted((rerun / "by_run").glob("*.json"))}
    if not new_runs:
        raise ValueError(f"{rerun / 'by_run'}: no evaluated runs to compare")
    unknown = sorted(new_runs.keys() - ref_runs.keys())
    if unknown:
        raise ValueError(f"{rerun / 'by_run'}: runs {unknown} have no counterpart in {reference / 'by_run'}")
    loss_by_arm: dict[str, list[float]] = {}
    for r in ref_runs.values():
        loss_by_arm.setdefault(r["arm"], []).append(mixture_loss(r))
    runs = []
    for name, new in new_runs.items():
        ref = ref_runs[name]
        spread = loss_by_arm[ref["arm"]]
        std = float(np.std(spread, ddof=1)) if len(spread) > 1 else math.nan
        field, worst = largest_difference(ref, new)
        delta = mixture_loss(new) - mixture_loss(ref)
        if worst <= SAME:
            verdict = "same"
        elif abs(delta) <= std:
            verdict = "within the seed spread"
        else:
            verdict = "outside the seed spread"
        runs.append(
            {
                "run": name,
                "loss_reference": mixture_loss(ref),
                "loss_rerun": mixture_loss(new),
                "passes_reference": passes(ref),
                "passes_rerun": passes(new),
                "loss_seed_std": std,
                "largest_relative_difference": worst,
                "at": field,
                "verdict": verdict,
            }
        )
    ref_data = json.loads((reference / "corpus.json").read_text()).get("sha256")
    new_data = json.loads((rerun / "corpus.json").read_text()).get("sha256")
    return {
        "data": "same bytes" if ref_data and ref_data == new_data else "differs or not recorded",
        "data_sha256": new_data,
        "runs": runs,
    }


def reproduced(comparison: dict[str, Any]) -> bool:
    return all(r["verdict"] != "outside the seed spread" for r in comparison["runs"])


def table(comparison: dict[str, Any]) -> list[str]:
    lines = [
        "| run | loss (study) | loss (rerun) | passes (study) | passes (rerun) | loss difference / seed std "
        "| largest relative difference of any number (where) | resumed from a checkpoint (study / rerun) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in comparison["runs"]:
        ratio = abs(r["loss_rerun"] - r["loss_reference"]) / r["loss_seed_std"]
        counts = (r.get("resumes_reference"), r.get("resumes_rerun"))
        resumed = " / ".join("?" if c is None else str(c) for c in counts)
        lines.append(
            f"| {r['run']} | {r['loss_reference']:.4f} | {r['loss_rerun']:.4f} | {r['passes_reference']:.4f} "
            f"| {r['passes_rerun']:.4f} | {ratio:.1e} | {r['largest_relative_difference']:.1e} "
            f"(`{r['at'] or '-'}`) | {resumed} | {r['verdict']} |"
        )
    return lines

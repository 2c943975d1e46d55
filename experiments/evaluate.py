"""Held-out evaluation of one trained run through `adaponder-eval`'s Python API (training/evaluate.py).

`evaluate_run` is the study's only evaluation entry point. The windows are the study's own: evenly
spaced over the whole validation shard (packages never seen in training), so a small budget still
samples every validation package. For adaptive models `adaponder-eval` also runs
  - the tau sweep: learned halting at each tau (the gates deciding, sparse forward);
  - fixed pruning: uniform and geometric exit depths (`exit_passes`, dense forward) matched to the
    mean passes of the learned policy at each tau.
The result is flattened into the study's own JSON (one dict per policy point, see `_point`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.indexed import MMapIndexedDataset
from training.evaluate import POLICIES, learned_settings, load_model, perplexity_points


def validation_windows(prefix: str, seq_len: int, count: int) -> list[np.ndarray]:
    """`count` windows of seq_len + 1 tokens, evenly spaced over the concatenated documents (0: every
    non-overlapping window, so each token of the shard but the first of a window is scored once)."""
    shard = MMapIndexedDataset(prefix)
    tokens = np.concatenate([shard[i] for i in range(len(shard))]).astype(np.int64)
    count = count or (len(tokens) - 1) // (seq_len + 1)
    stride = (len(tokens) - 1) // count
    if stride < seq_len + 1:
        raise ValueError(f"{prefix}: {len(tokens)} tokens are too few for {count} windows of {seq_len + 1}")
    return [tokens[s : s + seq_len + 1] for s in np.arange(count) * stride]


def _point(point: dict[str, Any], num_passes: int) -> dict[str, Any]:
    """An `adaponder-eval` point in the study's terms: loss, passes, FLOPs, NLL and share by passes."""
    by_passes = {p["passes"]: p for p in point["nll_by_passes"]}
    return {
        "loss": point["nll"],
        "ppl": point["ppl"],
        "mean_passes": point["mean_passes"],
        "flops_per_token": point["flops_per_token"],
        "dense_flops_per_token": point["flops_per_token"] / point["compute_vs_dense"],
        "compute_vs_k1": point["compute_vs_k1"],
        "nll_by_passes": [by_passes[j]["nll"] if j in by_passes else None for j in range(1, num_passes + 1)],
        "share_by_passes": [
            by_passes[j]["fraction"] if j in by_passes else 0.0 for j in range(1, num_passes + 1)
        ],
        "tokens": point["tokens"],
    }


def evaluate_run(
    run_dir: str | Path, valid_prefix: str, seq_len: int, windows: int, batch: int, taus: tuple[float, ...]
) -> dict[str, Any]:
    """Evaluate a run directory's latest checkpoint; a JSON-able dict (see the module docstring)."""
    torch.manual_seed(0)
    model, _, described = load_model(run_dir)
    config = model.config
    data = validation_windows(valid_prefix, seq_len, windows)
    policies = list(POLICIES) if config.adaptive else []
    settings = learned_settings(config, list(taus) if config.adaptive else [])
    points = perplexity_points(model, data, settings, policies, batch, seed=0, progress=False)
    k = config.num_passes
    learned = [_point(p, k) | {"tau": p["halt_threshold"]} for p in points[: len(settings)]]
    # perplexity_points appends, for each learned point in order, one point per policy.
    fixed = points[len(settings) :]
    for i, point in enumerate(learned):
        if policies:
            point["fixed_pruning"] = {
                name: _point(fixed[i * len(policies) + q], k) for q, name in enumerate(policies)
            }
    result: dict[str, Any] = {
        "evaluator": "adaponder-eval (training/evaluate.py)",
        "checkpoint": described["checkpoint"],
        "num_passes": k,
        "adaptive": bool(config.adaptive),
        "parameters": described["parameters"],
        "windows": windows,
        "seq_len": seq_len,
        "learned": learned[0],
    }
    if config.adaptive:
        result["tau_sweep"] = sorted(learned, key=lambda p: p["tau"])
    return result

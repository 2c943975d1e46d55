"""Held-out evaluation of one trained run: perplexity, passes, FLOPs, NLL by passes, policies, tau.

`evaluate_run` is the study's only evaluation entry point (one place to swap for `adaponder-eval`).
Everything runs in fp32 on evenly spaced windows of the validation shard (packages never
seen in training). For adaptive models it also runs
  - the tau sweep: the forward's `halt_threshold` set to each tau, the gates deciding;
  - fixed pruning: uniform and geometric exit depths (`exit_passes`) matched to the mean passes of
    the learned policy at each of `pruning_taus` (benchmarks/eval_halting_policy.py's distributions).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.eval_halting_policy import geometric_distribution, uniform_distribution
from data.indexed import MMapIndexedDataset
from model import AdaPonderForCausalLM

POLICIES = {"uniform": uniform_distribution, "geometric": geometric_distribution}


def validation_windows(prefix: str, seq_len: int, count: int) -> torch.Tensor:
    """`count` windows of seq_len + 1 tokens, evenly spaced over the concatenated documents."""
    shard = MMapIndexedDataset(prefix)
    tokens = np.concatenate([shard[i] for i in range(len(shard))]).astype(np.int64)
    stride = (len(tokens) - 1) // count
    if stride < seq_len + 1:
        raise ValueError(f"{prefix}: {len(tokens)} tokens are too few for {count} windows of {seq_len + 1}")
    starts = np.arange(count) * stride
    return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]))


@torch.no_grad()
def run_policy(
    model: AdaPonderForCausalLM,
    windows: torch.Tensor,
    batch: int,
    exit_passes: torch.Tensor | None = None,
    tau: float | None = None,
) -> dict[str, Any]:
    """One pass over the windows: loss, passes, FLOPs per token, NLL by passes run.

    The gates decide at threshold `tau` (sparse eval path: halted tokens are skipped), unless
    `exit_passes` fixes every token's passes (dense path, the only one that takes it).
    """
    k = model.config.num_passes
    nll = torch.zeros(k, dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.float64)
    flops = {"total": 0.0, "dense_total": 0.0}
    passes_all = []
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        exits = None if exit_passes is None else exit_passes[i : i + batch]
        if exits is None:
            out = model(w[:, :-1], labels=w[:, 1:], shift_labels=False, halt_threshold=tau)
        else:
            out = model(w[:, :-1], labels=w[:, 1:], shift_labels=False, dense=True, exit_passes=exits)
        mask = out.loss_mask.flatten()
        passes = out.passes.flatten()[mask] - 1
        nll.index_add_(0, passes, out.token_nll.flatten()[mask].double())
        count.index_add_(0, passes, torch.ones_like(passes, dtype=torch.float64))
        for key in flops:
            flops[key] += float(out.flops[key])
        passes_all.append(out.passes)
    tokens = float(count.sum())
    loss = float(nll.sum()) / tokens
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "mean_passes": float((torch.arange(1, k + 1) * count).sum()) / tokens,
        "flops_per_token": flops["total"] / tokens,
        "dense_flops_per_token": flops["dense_total"] / tokens,
        "nll_by_passes": [float(n / c) if c else None for n, c in zip(nll, count)],
        "share_by_passes": [float(c) / tokens for c in count],
        "tokens": tokens,
        "passes": torch.cat(passes_all),
    }


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key != "passes"}


def _fixed_pruning(
    model: AdaPonderForCausalLM, windows: torch.Tensor, batch: int, mean: float, seed: int
) -> dict[str, Any]:
    k = model.config.num_passes
    shape = (windows.shape[0], windows.shape[1] - 1)
    rows = {}
    for name, distribution in POLICIES.items():
        rng = np.random.default_rng(seed)
        exits = torch.from_numpy(rng.choice(np.arange(1, k + 1), size=shape, p=distribution(mean, k)))
        rows[name] = _public(run_policy(model, windows, batch, exits))
    return rows


def evaluate_run(
    model_dir: str | Path,
    valid_prefix: str,
    seq_len: int,
    windows: int,
    batch: int,
    taus: tuple[float, ...],
    pruning_taus: tuple[float, ...],
) -> dict[str, Any]:
    """Evaluate an exported model directory; a JSON-able dict (see the module docstring)."""
    torch.manual_seed(0)
    model = AdaPonderForCausalLM.from_pythia(str(model_dir)).float().eval()
    data = validation_windows(valid_prefix, seq_len, windows)
    result: dict[str, Any] = {
        "num_passes": model.config.num_passes,
        "adaptive": bool(model.config.adaptive),
        "parameters": sum(p.numel() for p in model.parameters()),
        "windows": windows,
        "seq_len": seq_len,
    }
    if not model.config.adaptive:
        result["learned"] = _public(run_policy(model, data, batch))
        return result
    trained_tau = model.config.halt_threshold
    sweep = []
    for tau in sorted(set(taus) | set(pruning_taus) | {trained_tau}):
        point = {"tau": tau, **_public(run_policy(model, data, batch, tau=tau))}
        if tau in pruning_taus:
            point["fixed_pruning"] = _fixed_pruning(model, data, batch, point["mean_passes"], seed=0)
        sweep.append(point)
    result["learned"] = next(p for p in sweep if p["tau"] == trained_tau)
    result["tau_sweep"] = sweep
    return result

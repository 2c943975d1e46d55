"""Held-out evaluation of one trained run through `adaponder-eval`'s Python API (training/evaluate.py).

`evaluate_run` is the study's only evaluation entry point. Two sets of windows:

- the whole validation shards (`eval_windows` 0: every non-overlapping window; else that many, evenly
  spaced): code from packages never trained on, and held-out generated programs. Each run's main
  numbers, at its trained halting threshold; for an adaptive run also the same tokens with every pass
  forced (nobody halts, the gates still scale the updates), grouped by the pass the learned policy
  stopped at: whether the tokens that run longer are the ones that stay hard when given every pass,
  a comparison that does not depend on the compute each token received;
- the sweep set: `sweep_windows` windows spread over both shards in proportion to their tokens,
  where the compute curves are drawn (every point of every arm on the same tokens):
    - every model at its trained setting;
    - adaptive models: learned halting at each tau, and fixed pruning (uniform and geometric exit
      depths, `exit_passes`) at the mean passes of each, with the gates' scaling of the updates kept
      and neutralised (`gate_scaling=False`), `draws` random assignments each;
    - the plain PonderLM arms the adaptive ones are compared with (`EXIT_BASELINES`): fixed pruning
      at each mean of `pass_grid` (`draws` assignments each) and the training-free confidence exit
      (`exit_confidence`: a token stops once its pass's next-token distribution puts at least c on
      one token) at each c of `confidences`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.indexed import MMapIndexedDataset
from training.evaluate import (
    POLICIES,
    Tally,
    batches,
    evaluate_windows,
    fixed_pruning_exits,
    load_model,
    point,
)


@dataclass(frozen=True)
class Sweeps:
    """What the sweep set measures besides each model's trained setting."""

    taus: tuple[float, ...]  # halting thresholds of the adaptive models
    pass_grid: tuple[float, ...]  # mean passes of fixed pruning on plain PonderLM
    confidences: tuple[float, ...]  # thresholds of the confidence exit on plain PonderLM
    draws: int  # random exit assignments per fixed-pruning point


def shard_tokens(prefix: str) -> np.ndarray:
    shard = MMapIndexedDataset(prefix)
    return np.concatenate([shard[i] for i in range(len(shard))]).astype(np.int64)


def validation_windows(prefix: str, seq_len: int, count: int) -> list[np.ndarray]:
    """`count` windows of seq_len + 1 tokens, evenly spaced over the concatenated documents (0: every
    non-overlapping window, so each token of the shard but the first of a window is scored once)."""
    tokens = shard_tokens(prefix)
    count = count or (len(tokens) - 1) // (seq_len + 1)
    stride = (len(tokens) - 1) // count
    if stride < seq_len + 1:
        raise ValueError(f"{prefix}: {len(tokens)} tokens are too few for {count} windows of {seq_len + 1}")
    return [tokens[s : s + seq_len + 1] for s in np.arange(count) * stride]


def sweep_windows(shards: dict[str, str], seq_len: int, total: int) -> list[np.ndarray]:
    """`total` windows over the shards, each shard's share its share of the tokens (at least one)."""
    # Token counts from the index alone (no shard is read here; validation_windows reads each once).
    sizes = {name: int(MMapIndexedDataset(prefix).sizes.sum()) for name, prefix in shards.items()}
    whole = sum(sizes.values())
    windows = []
    for name, prefix in shards.items():
        windows += validation_windows(prefix, seq_len, max(1, round(total * sizes[name] / whole)))
    return windows


def _point(p: dict[str, Any], num_passes: int) -> dict[str, Any]:
    """An `adaponder-eval` point in the study's terms: loss, passes, FLOPs, NLL and share by passes."""
    by_passes = {q["passes"]: q for q in p["nll_by_passes"]}
    return {
        "loss": p["nll"],
        "mean_passes": p["mean_passes"],
        "flops_per_token": p["flops_per_token"],
        "compute_vs_k1": p["compute_vs_k1"],
        "nll_by_passes": [by_passes[j]["nll"] if j in by_passes else None for j in range(1, num_passes + 1)],
        "share_by_passes": [
            by_passes[j]["fraction"] if j in by_passes else 0.0 for j in range(1, num_passes + 1)
        ],
        "tokens": p["tokens"],
    }


@torch.no_grad()
def forced_by_learned_depth(model: Any, windows: list[np.ndarray], batch: int) -> tuple[dict[str, Any], list]:
    """The trained setting's point on `windows`, and per learned exit depth j (passes the trained
    policy ran): the share of tokens, their NLL as halted and their NLL with every pass forced
    (tau 0: no token halts; the gates still scale the updates)."""
    k = model.config.num_passes
    tally = Tally(model.config)
    count, learned, forced = np.zeros(k), np.zeros(k), np.zeros(k)
    for ids_BT, real_BT, targets_BT in batches(windows, batch):
        mask = real_BT.long()
        out = model(ids_BT, attention_mask=mask, labels=targets_BT, shift_labels=False)
        full = model(ids_BT, attention_mask=mask, labels=targets_BT, shift_labels=False, halt_threshold=0.0)
        tally.add(out.passes, real_BT, out.flops, token_nll_BT=out.token_nll)
        depth = (out.passes[real_BT] - 1).numpy()
        count += np.bincount(depth, minlength=k)
        learned += np.bincount(depth, out.token_nll[real_BT].double().numpy(), minlength=k)
        forced += np.bincount(depth, full.token_nll[real_BT].double().numpy(), minlength=k)
    by_depth = [
        {
            "passes": j + 1,
            "share": count[j] / count.sum(),
            "nll_learned": learned[j] / count[j],
            "nll_forced": forced[j] / count[j],
        }
        for j in range(k)
        if count[j]
    ]
    return _point(point(tally, "learned", None, None), k), by_depth


def _measure(model: Any, windows: list[np.ndarray], batch: int, **setting: Any) -> dict[str, Any]:
    """One point on `windows`: learned halting (`halt_threshold`), or `exits` with the model knobs."""
    exits = setting.pop("exits", None)
    tau = setting.pop("halt_threshold", None)
    tally: Tally = evaluate_windows(
        model, windows, batch, tau, exits=exits, progress=False, knobs=setting or None
    )
    return _point(point(tally, "learned" if exits is None else "fixed", tau, None), model.config.num_passes)


def _fixed(
    model: Any,
    windows: list[np.ndarray],
    batch: int,
    policy: str,
    mean: float,
    draws: int,
    tokens: int,
    **knobs: Any,
) -> dict[str, Any]:
    """Fixed pruning at `mean` passes: one point per random assignment (seeds 0 .. draws - 1)."""
    k = model.config.num_passes
    points = [
        _measure(model, windows, batch, exits=fixed_pruning_exits(policy, mean, k, tokens, seed), **knobs)
        for seed in range(draws)
    ]
    return {"policy": policy, "target_mean_passes": mean, **knobs, "draws": points}


def sweep(
    model: Any, windows: list[np.ndarray], batch: int, sweeps: Sweeps, baselines: bool
) -> dict[str, Any]:
    """Every point of the model on the sweep set (see the module docstring); `baselines`: measure a
    plain PonderLM's training-free exits."""
    config = model.config
    trained = _measure(model, windows, batch)
    result: dict[str, Any] = {"trained": trained}
    tokens = trained["tokens"]
    if config.adaptive:
        learned = [trained | {"tau": config.halt_threshold}]
        learned += [
            _measure(model, windows, batch, halt_threshold=t) | {"tau": t}
            for t in sweeps.taus
            if t != config.halt_threshold
        ]
        result["learned"] = sorted(learned, key=lambda p: p["tau"])
        result["fixed"] = [
            _fixed(
                model, windows, batch, policy, p["mean_passes"], sweeps.draws, tokens, gate_scaling=scaling
            )
            | {"tau": p["tau"]}
            for p in result["learned"]
            for policy in POLICIES
            for scaling in (True, False)
        ]
    elif baselines:
        result["fixed"] = [
            _fixed(model, windows, batch, policy, mean, sweeps.draws, tokens)
            for mean in sweeps.pass_grid
            for policy in POLICIES
        ]
        result["confidence"] = [
            _measure(model, windows, batch, exit_confidence=c) | {"confidence": c} for c in sweeps.confidences
        ]
    return result


def evaluate_run(
    run_dir: str | Path,
    shards: dict[str, str],
    seq_len: int,
    windows: int,
    sweep_total: int,
    batch: int,
    sweeps: Sweeps,
    baselines: bool = False,
) -> dict[str, Any]:
    """Evaluate a run directory's latest checkpoint; a JSON-able dict (see the module docstring).
    `shards`: validation shard prefixes by name (the first is the code shard); `baselines`: measure
    the training-free exits of a plain PonderLM."""
    torch.manual_seed(0)
    model, _, described = load_model(run_dir)
    config = model.config
    result: dict[str, Any] = {
        "evaluator": "adaponder-eval (training/evaluate.py)",
        "checkpoint": described["checkpoint"],
        "num_passes": config.num_passes,
        "adaptive": bool(config.adaptive),
        "halt_threshold": config.halt_threshold if config.adaptive else None,
        "parameters": described["parameters"],
        "seq_len": seq_len,
        "shards": {},
    }
    for name, prefix in shards.items():
        data = validation_windows(prefix, seq_len, windows)
        if config.adaptive:
            entry, by_depth = forced_by_learned_depth(model, data, batch)
            result["shards"][name] = entry | {"forced_by_learned_depth": by_depth}
        else:
            result["shards"][name] = _measure(model, data, batch)
    result["sweep"] = sweep(model, sweep_windows(shards, seq_len, sweep_total), batch, sweeps, baselines)
    return result

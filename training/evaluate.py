"""`adaponder-eval`: quality and compute of an AdaPonderLM, measured together.

MODEL is an exported Hugging Face directory (`adaponder-export`) or a run directory (its latest
checkpoint, or `--tag`), read without DeepSpeed. The model runs in eval mode under `no_grad`, where
its forward skips halted tokens, so the compute reported is the compute spent; FLOPs come from the
model's own accounting (`out.flops`, `model.accounting.forward_flops`).

    adaponder-eval MODEL --output DIR --data PREFIX [--split 949,50,1 --split-name valid]
    adaponder-eval MODEL --output DIR --tasks TASK,... [--include-path DIR]
    adaponder-eval MODEL --output DIR --data PREFIX --sweep-threshold 0.01,0.1 --policies uniform,geometric

Writes DIR/eval.json and two plots where they have something to show: DIR/quality_vs_compute.png
(each quality measure against mean passes, learned halting against fixed pruning; written when some
curve has more than one point, i.e. with a sweep or policies) and DIR/nll_by_passes.png (the held-out
NLL of tokens grouped by the passes they ran; written with --data). The JSON:

    {"model": {...}, "data": {...} | null,
     "points": [{"policy": "learned" | "uniform" | "geometric", "halt_threshold": float | null,
                 "max_passes": int | null, "nll": float, "ppl": float, "mean_passes": float,
                 "tokens": int, "flops_per_token": float, "compute_vs_k1": float,
                 "compute_vs_dense": float, "nll_by_passes": [{"passes": j, "fraction": f, "nll": x}],
                 "target_mean_passes": float (fixed pruning only)}, ...],
     "tasks": {TASK: [{"policy", "halt_threshold", "max_passes", "metrics": {"acc,none": ...},
                       "mean_passes", "tokens", "flops_per_token", "compute_vs_k1",
                       "compute_vs_dense", "target_mean_passes" (fixed pruning only)}, ...]}}

The first point is the model at its trained settings (tau and cap from its config); learned points
follow, one per further tau of `--sweep-threshold`, then one per further cap of
`--sweep-max-passes` (at the trained tau); then, for each learned point and each policy of
`--policies`, fixed pruning (exit depths drawn from that distribution, `exit_passes`) at the
learned point's mean passes. `nll_by_passes` lists the passes run by at least one token. Tasks run at
the same learned settings, and fixed pruning at the mean passes of the task's own tokens (exit
depths drawn per token, loglikelihood tasks only). Without `--data`, `points` is empty.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from data.config import DataConfig
from data.dataset import SPLITS, split_range
from data.indexed import MMapIndexedDataset, data_path, index_path
from model import AdaPonderConfig, AdaPonderForCausalLM
from model.accounting import active_from_passes, forward_flops
from training import loading
from training.loading import load_tokenizer
from training.rundir import write_durable

POLICIES = ("uniform", "geometric")
DEFAULT_SEQ_LEN = 512


# --- loading ------------------------------------------------------------------------------------


def load_model(path: str | Path, tag: str | None = None) -> tuple[AdaPonderForCausalLM, str | None, dict]:
    """A run directory (`tag` or its newest checkpoint), an export or a Pythia / PonderLM directory
    (training.loading) -> (model in eval mode, tokenizer path, description)."""
    loaded = loading.load_model(path, tag)
    cfg = loaded.model.config
    described = loaded.described | {
        "num_passes": cfg.num_passes,
        "adaptive": cfg.adaptive,
        "halt_threshold": cfg.halt_threshold,
        "max_passes": cfg.max_passes,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
    }
    return loaded.model, loaded.tokenizer, described


# --- held-out windows ---------------------------------------------------------------------------


def document_windows(
    prefix: str,
    seq_len: int,
    split: str | None = None,
    split_name: str = "valid",
    max_windows: int | None = None,
    vocab_size: int | None = None,
) -> tuple[list[np.ndarray], dict]:
    """Windows of at most `seq_len + 1` tokens, each inside one document, consecutive windows of a
    document sharing one token, so every token but a document's first is predicted exactly once.

    `split` cuts the shard into train/valid/test document ranges as `data.split` does for training
    (DataConfig.split_fractions, split_range); None takes the whole shard. With `vocab_size`, a token
    id outside [0, vocab_size) is an error naming its document and position.
    """
    for path in (data_path(prefix), index_path(prefix)):
        if not Path(path).is_file():
            raise ValueError(f"--data {prefix}: {path} does not exist")
    if seq_len < 1:
        raise ValueError(f"--seq-len {seq_len}: must be >= 1")
    shard = MMapIndexedDataset(prefix)
    if split is None:
        documents = range(len(shard))
    else:
        if split_name not in SPLITS:
            raise ValueError(f"--split-name {split_name!r}: expected one of {SPLITS}")
        fractions = DataConfig(split=split).split_fractions()
        documents = split_range(len(shard), fractions, SPLITS.index(split_name))
    windows: list[np.ndarray] = []
    for document in documents:
        tokens = shard[document].astype(np.int64)
        if vocab_size is not None and len(tokens):
            bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
            if len(bad):
                raise ValueError(
                    f"--data {prefix}: token id {tokens[bad[0]]} at position {bad[0]} of document "
                    f"{document} is outside the model's vocabulary [0, {vocab_size})"
                )
        for start in range(0, len(tokens) - 1, seq_len):
            if max_windows is not None and len(windows) == max_windows:
                break
            windows.append(tokens[start : start + seq_len + 1])
    if not windows:
        raise ValueError(f"--data {prefix}: no document of split {split_name!r} has two tokens")
    described = {
        "prefix": prefix,
        "split": split,
        "split_name": split_name if split is not None else None,
        "documents": [documents.start, documents.stop],
        "seq_len": seq_len,
        "windows": len(windows),
        "tokens": sum(len(w) - 1 for w in windows),
    }
    return windows, described


def batches(
    windows: list[np.ndarray], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input ids [B, T], real-token mask [B, T], targets [B, T] with -100 on padding), right-padded."""
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        width = max(len(w) for w in chunk) - 1
        ids_BT = torch.zeros(len(chunk), width, dtype=torch.long)
        targets_BT = torch.full_like(ids_BT, -100)
        real_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
        for row, window in enumerate(chunk):
            n = len(window) - 1
            ids_BT[row, :n] = torch.from_numpy(window[:-1])
            targets_BT[row, :n] = torch.from_numpy(window[1:])
            real_BT[row, :n] = True
        yield ids_BT, real_BT, targets_BT


# --- statistics ---------------------------------------------------------------------------------


class Tally:
    """Sums over the real tokens of many forward calls: NLL, passes, FLOPs (as run, at K = 1, with
    all K passes) and NLL by passes run."""

    def __init__(self, config: AdaPonderConfig):
        self.config = config
        self.tokens, self.passes = 0, 0
        self.nll, self.flops, self.flops_k1, self.flops_dense = 0.0, 0.0, 0.0, 0.0
        self.count_K = torch.zeros(config.num_passes, dtype=torch.float64)
        self.nll_K = torch.zeros(config.num_passes, dtype=torch.float64)

    def add(
        self,
        passes_BT: torch.Tensor,
        real_BT: torch.Tensor,
        flops: dict[str, torch.Tensor] | None = None,
        past_real_B: torch.Tensor | None = None,
        token_nll_BT: torch.Tensor | None = None,
    ) -> None:
        """One forward call. `flops` is the call's `out.flops` (over its real tokens); None
        recomputes them from the passes, for calls whose padding the model took for tokens."""
        real_BT = real_BT.bool()
        if flops is None:
            flops = forward_flops(self.config, active_from_passes(passes_BT, self.config.num_passes), real_BT)
        k1 = forward_flops(self.config, real_BT[None], real_BT, past_real_B)  # one pass, no gate
        self.flops += float(flops["total"])
        self.flops_dense += float(flops["dense_total"])
        self.flops_k1 += float(k1["total"])
        index = (passes_BT[real_BT] - 1).cpu()
        self.tokens += index.numel()
        self.passes += int(index.sum()) + index.numel()
        self.count_K += torch.bincount(index, minlength=self.config.num_passes).double()
        if token_nll_BT is not None:
            nll = token_nll_BT[real_BT].double().cpu()
            self.nll += float(nll.sum())
            self.nll_K.index_add_(0, index, nll)

    def compute(self) -> dict[str, Any]:
        tokens = max(self.tokens, 1)
        return {
            "mean_passes": self.passes / tokens,
            "tokens": self.tokens,
            "flops_per_token": self.flops / tokens,
            "compute_vs_k1": self.flops / max(self.flops_k1, 1.0),
            "compute_vs_dense": self.flops / max(self.flops_dense, 1.0),
        }

    def quality(self) -> dict[str, Any]:
        nll = self.nll / max(self.tokens, 1)
        by_passes = [
            {"passes": j + 1, "fraction": float(count) / self.tokens, "nll": float(self.nll_K[j] / count)}
            for j, count in enumerate(self.count_K.tolist())
            if count > 0
        ]
        return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "nll_by_passes": by_passes}


# --- fixed-pruning baselines --------------------------------------------------------------------


def uniform_exit_distribution(mean: float, num_passes: int) -> np.ndarray:
    """P(exit after pass j), j = 1..K: uniform over the early exits 1..K-1 with total mass a, the
    rest runs all K passes (mean K - a K / 2, down to K / 2 at a = 1); below K / 2 the uniform part
    gives way to exits after pass 1."""
    k = num_passes
    mean = min(max(mean, 1.0), float(k))
    if k == 1:
        return np.ones(1)
    if mean >= k / 2:
        a = 2 * (k - mean) / k
        return np.array([a / (k - 1)] * (k - 1) + [1 - a])
    b = (mean - 1) / (k / 2 - 1)  # mean = b K / 2 + (1 - b) * 1
    return np.array([b / (k - 1) + (1 - b)] + [b / (k - 1)] * (k - 2) + [0.0])


def geometric_exit_distribution(mean: float, num_passes: int) -> np.ndarray:
    """P(exit after pass j) = c^(j-1) (1 - c), P(K) = c^(K-1): after every pass a token goes on with
    probability c, with sum_{j<K} c^j = mean (bisection)."""
    k = num_passes
    mean = min(max(mean, 1.0), float(k))
    low, high = 0.0, 1.0
    for _ in range(60):
        c = (low + high) / 2
        low, high = (c, high) if sum(c**j for j in range(k)) < mean else (low, c)
    return np.array([c ** (j - 1) * (1 - c) for j in range(1, k)] + [c ** (k - 1)])


EXIT_DISTRIBUTIONS = {"uniform": uniform_exit_distribution, "geometric": geometric_exit_distribution}


def stratified_exits(probs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` exit depths (1..K) whose histogram is `probs` up to rounding (largest remainders),
    dealt to random positions: the mean passes matches the distribution's to within K / count."""
    exact = probs * count
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: count - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(1, len(probs) + 1), counts))


# --- perplexity ---------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_windows(
    model: AdaPonderForCausalLM,
    windows: list[np.ndarray],
    batch_size: int = 8,
    halt_threshold: float | None = None,
    max_passes: int | None = None,
    exits: np.ndarray | None = None,
    progress: bool = True,
    desc: str = "eval",
    knobs: dict[str, Any] | None = None,
) -> Tally:
    """NLL, passes and FLOPs of the model over `windows`: the gates decide (sparse forward, at
    `halt_threshold` / `max_passes`), or `exits` (one depth per predicted token, windows in order)
    fixes every token's passes (`exit_passes`); either way the pruned passes are skipped. `knobs`:
    further forward arguments of every call (`gate_scaling`, `exit_confidence`)."""
    device = next(model.parameters()).device
    tally = Tally(model.config)
    used = 0
    total = -(-len(windows) // batch_size)
    shown = tqdm(batches(windows, batch_size), total=total, desc=desc, disable=not progress)
    for ids_BT, real_BT, targets_BT in shown:
        ids_BT, real_BT, targets_BT = ids_BT.to(device), real_BT.to(device), targets_BT.to(device)
        if exits is None:
            knob = {"halt_threshold": halt_threshold, "max_passes": max_passes}
        else:
            exits_BT = torch.ones_like(ids_BT)
            n = int(real_BT.sum())
            exits_BT[real_BT] = torch.from_numpy(exits[used : used + n]).to(device)
            used += n
            knob = {"exit_passes": exits_BT}
        knob |= knobs or {}
        out = model(ids_BT, attention_mask=real_BT.long(), labels=targets_BT, shift_labels=False, **knob)
        tally.add(out.passes, real_BT, out.flops, token_nll_BT=out.token_nll)
    return tally


def point(tally: Tally, policy: str, halt_threshold: float | None, max_passes: int | None) -> dict[str, Any]:
    setting = {"policy": policy, "halt_threshold": halt_threshold, "max_passes": max_passes}
    return setting | tally.quality() | tally.compute()


def learned_settings(
    config: AdaPonderConfig, thresholds: list[float] = (), caps: list[int] = ()
) -> list[tuple[float, int | None]]:
    """(tau, cap) of the learned points: the trained setting first, then each further tau (at the
    trained cap), then each further cap on passes (at the trained tau)."""
    settings = [(config.halt_threshold, config.max_passes)]
    for setting in [(t, config.max_passes) for t in thresholds] + [(config.halt_threshold, c) for c in caps]:
        if setting not in settings:
            settings.append(setting)
    return settings


def fixed_pruning_exits(policy: str, mean: float, num_passes: int, count: int, seed: int) -> np.ndarray:
    if policy not in EXIT_DISTRIBUTIONS:
        raise ValueError(f"--policies {policy!r}: expected a subset of {POLICIES}")
    probs = EXIT_DISTRIBUTIONS[policy](mean, num_passes)
    return stratified_exits(probs, count, np.random.default_rng(seed))


def perplexity_points(
    model: AdaPonderForCausalLM,
    windows: list[np.ndarray],
    settings: list[tuple[float, int | None]],
    policies: list[str] = (),
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The points of eval.json: learned halting at each (tau, cap) of `settings` (learned_settings),
    then fixed pruning at their mean passes."""
    points = []
    for tau, cap in settings:
        desc = f"learned tau={tau:g}" + (f" cap={cap}" if cap else "")
        tally = evaluate_windows(model, windows, batch_size, tau, cap, progress=progress, desc=desc)
        points.append(point(tally, "learned", tau, cap))
    tokens = points[0]["tokens"]
    for learned in list(points):
        for policy in policies:
            exits = fixed_pruning_exits(policy, learned["mean_passes"], model.config.num_passes, tokens, seed)
            desc = f"{policy} at {learned['mean_passes']:.3f} passes"
            tally = evaluate_windows(model, windows, batch_size, exits=exits, progress=progress, desc=desc)
            points.append(point(tally, policy, None, None) | {"target_mean_passes": learned["mean_passes"]})
    return points


# --- lm-eval ------------------------------------------------------------------------------------


def _tracked_lm_class():
    """HFLM that reports the halting statistics of the real tokens of every call it makes."""
    from lm_eval.models.huggingface import HFLM

    class HaltingTrackedLM(HFLM):
        def __init__(self, model, tokenizer, batch_size, knob, exit_probs, seed):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            self.tally = Tally(model.config)
            self.knob, self.exit_probs = knob, exit_probs
            self.rng = np.random.default_rng(seed)
            self._passes_BT, self._row = None, 0

        def _model_call(self, inps, attn_mask=None, labels=None):
            # Loglikelihood batches come right-padded without a mask: the padding runs as tokens, and
            # the real length of each row is known only in _select_cont_toks.
            knob = self.knob
            if self.exit_probs is not None:
                depths = np.arange(1, len(self.exit_probs) + 1)
                exits = self.rng.choice(depths, size=inps.shape, p=self.exit_probs)
                knob = {"exit_passes": torch.from_numpy(exits).to(inps.device)}
            with torch.no_grad():
                out = self.model(inps, **knob)
            self._passes_BT, self._row = out.passes, 0
            return out.logits

        def _select_cont_toks(self, logits, contlen=None, inplen=None):
            passes_1T = self._passes_BT[self._row][None]
            self._row += 1
            real_1T = torch.arange(passes_1T.shape[1], device=passes_1T.device)[None] < inplen
            self.tally.add(passes_1T, real_1T)
            return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.exit_probs is not None:
                raise ValueError("fixed-pruning policies run loglikelihood tasks only")
            handle = self.model.register_forward_hook(self._count_generation, with_kwargs=True)
            # generate() asks the model for no halting statistics (the decode step skips them).
            knob = {**self.knob, "output_halting": True}
            try:
                return super()._model_generate(context, max_length, stop, **knob, **generation_kwargs)
            finally:
                handle.remove()

        def _count_generation(self, module, args, kwargs, out):
            ids_BT = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            width = ids_BT.shape[1]
            real_BT = torch.ones_like(ids_BT, dtype=torch.bool) if mask is None else mask[:, -width:].bool()
            past_B = mask[:, :-width].sum(-1) if mask is not None and mask.shape[1] > width else None
            self.tally.add(out.passes, real_BT, out.flops, past_B)

    return HaltingTrackedLM


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager knowing `tasks`; only the local ones are indexed when they suffice
    (indexing lm-eval's own thousands of task files takes seconds)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError(f"--tasks needs lm-eval: pip install -e '.[eval]' ({e})") from e
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ValueError(f"--include-path {include_path}: not a directory")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ValueError(f"--tasks: unknown task(s) {unknown} (not in lm-eval{where})")
    return manager


def evaluate_tasks(
    model: AdaPonderForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    include_path: str | None = None,
    manager: Any = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    halt_threshold: float | None = None,
    max_passes: int | None = None,
    exit_probs: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Each lm-eval task's metrics and the passes and compute its tokens used (task by task, so
    every task's halting statistics are its own). `manager`: a `task_manager(...)` to reuse."""
    import lm_eval

    manager = manager or task_manager(tasks, include_path)
    knob = {"halt_threshold": halt_threshold, "max_passes": max_passes}
    results = {}
    for task in tasks:
        lm = _tracked_lm_class()(model, tokenizer, batch_size, knob, exit_probs, seed)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        # lm-eval names metrics "metric,filter" (other keys: alias, sample_len, ...).
        metrics = {
            name: value
            for name, value in output["results"].get(task, {}).items()
            if "," in name and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        results[task] = {"metrics": metrics} | lm.tally.compute()
    return results


def task_points(
    model: AdaPonderForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    settings: list[tuple[float, int | None]],
    policies: list[str],
    **options: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Tasks at every learned setting and, for each policy, fixed pruning at the mean passes the
    task's tokens ran at that setting."""
    options["manager"] = task_manager(tasks, options.get("include_path"))
    table: dict[str, list[dict[str, Any]]] = {task: [] for task in tasks}
    learned = []
    for tau, cap in settings:
        result = evaluate_tasks(model, tokenizer, tasks, halt_threshold=tau, max_passes=cap, **options)
        for task in tasks:
            table[task].append({"policy": "learned", "halt_threshold": tau, "max_passes": cap} | result[task])
        learned.append(result)
    for result in learned:
        for policy in policies:
            for task in tasks:
                mean = result[task]["mean_passes"]
                probs = EXIT_DISTRIBUTIONS[policy](mean, model.config.num_passes)
                fixed = evaluate_tasks(model, tokenizer, [task], exit_probs=probs, **options)[task]
                entry = {"policy": policy, "halt_threshold": None, "max_passes": None}
                table[task].append(entry | fixed | {"target_mean_passes": mean})
    return table


# --- output -------------------------------------------------------------------------------------


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The metric a task's curve shows: acc_norm, acc, exact_match, else the first non-stderr one."""
    names = [n for n in metrics if "stderr" not in n]
    for preferred in ("acc_norm,none", "acc,none", "exact_match,none"):
        if preferred in names:
            return preferred
    return names[0] if names else None


def share_label(fraction: float) -> str:
    """A share of tokens as a bar label: "<1%" rather than a misleading "0%" for a few tokens."""
    return "<1%" if 0 < fraction < 0.005 else f"{fraction:.0%}"


def setting_label(p: dict) -> str:
    """A learned point's setting, e.g. "tau 0.01" or "tau 0.0001, cap 2"."""
    cap = f", cap {p['max_passes']}" if p["max_passes"] else ""
    return f"tau {p['halt_threshold']:g}{cap}"


def quality_panels(report: dict) -> list[dict[str, Any]]:
    """What quality_vs_compute.png draws: one panel per quality measure (held-out perplexity, each
    task's primary metric), each a list of series {"label", "points": [(mean passes, value, note)],
    "line"}: the learned tau sweep (a line, points annotated with tau), the learned points under a
    cap (markers), and each fixed-pruning policy (a line through its iso-compute points)."""
    measures = []
    if report["points"]:
        measures.append(("held-out perplexity", "perplexity", report["points"], lambda p: p["ppl"]))
    for task, entries in report["tasks"].items():
        metric = primary_metric(entries[0]["metrics"])
        if metric is not None:
            value = lambda p, m=metric: p["metrics"].get(m, float("nan"))
            measures.append((f"{task}", metric.split(",")[0], entries, value))
    panels = []
    for title, ylabel, entries, value in measures:
        learned = [p for p in entries if p["policy"] == "learned"]
        groups = [
            ("learned halting, tau swept", [p for p in learned if not p["max_passes"]], True),
            ("learned halting under a cap", [p for p in learned if p["max_passes"]], False),
        ] + [
            (f"fixed pruning, {policy} exits", [p for p in entries if p["policy"] == policy], True)
            for policy in POLICIES
        ]
        series = []
        for label, chosen, line in groups:
            chosen = sorted(chosen, key=lambda p: p["mean_passes"])
            if chosen:
                notes = [setting_label(p) if p["policy"] == "learned" else "" for p in chosen]
                points = [(p["mean_passes"], value(p), n) for p, n in zip(chosen, notes)]
                series.append({"label": label, "points": points, "line": line and len(points) > 1})
        panels.append({"title": title, "ylabel": ylabel, "series": series})
    return panels


def nll_by_passes_bars(report: dict) -> list[dict[str, Any]]:
    """What nll_by_passes.png draws: per learned point, one bar per pass count that some token ran
    (its tokens' mean NLL, labelled with their share); a pass count no token ran gets no bar."""
    return [
        {
            "label": f"{setting_label(p)}: {p['mean_passes']:.2f} passes per token",
            "bars": [(r["passes"], r["nll"], r["fraction"]) for r in p["nll_by_passes"] if r["fraction"] > 0],
        }
        for p in report["points"]
        if p["policy"] == "learned" and p["nll_by_passes"]
    ]


def plots_to_write(report: dict) -> dict[str, str | None]:
    """For each plot, None when it is written, else why not (a figure with nothing on it, or a single
    dot, says nothing that eval.json and the printed table do not)."""
    why: dict[str, str | None] = {"quality": None, "nll": None}
    if not any(len(s["points"]) > 1 for panel in quality_panels(report) for s in panel["series"]):
        why["quality"] = "one setting only; --sweep-threshold, --sweep-max-passes or --policies add points"
    if not nll_by_passes_bars(report):
        why["nll"] = (
            "no held-out perplexity (--data) was measured" if not report["points"] else "no learned point"
        )
    return why


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def model_description(report: dict) -> str:
    """The model in words for a plot title (its size, passes and checkpoint), not its path."""
    model = report["model"]
    words = f"{model['parameters'] / 1e6:.1f}M parameters, up to {model['num_passes']} passes"
    return words + (f", step {model['step']}" if model.get("step") is not None else "")


def quality_figure(report: dict):
    plt = _pyplot()
    panels = quality_panels(report)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    markers = {"learned halting, tau swept": "o", "learned halting under a cap": "D"}
    for ax, panel in zip(axes[0], panels):
        for i, s in enumerate(panel["series"]):
            xs, ys, notes = zip(*s["points"])
            style = ("-" if s["line"] else "") + markers.get(
                s["label"], "s" if "uniform" in s["label"] else "^"
            )
            ax.plot(
                xs, ys, style, color=f"C{i}", label=s["label"], mfc="none" if "fixed" in s["label"] else None
            )
            for x, y, note in zip(xs, ys, notes):
                if note:
                    ax.annotate(
                        note, (x, y), fontsize=7, color=f"C{i}", xytext=(4, 4), textcoords="offset points"
                    )
        ax.set_xlabel(f"mean passes per token (of {report['model']['num_passes']})")
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Quality against compute: {model_description(report)}")
    fig.tight_layout()
    return fig


def check_output_dir(output: str | Path) -> None:
    """Make `output` (a directory), or say why it cannot be one."""
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--output {output}: it or a directory above it is a file") from None
    except OSError as e:
        raise ValueError(f"--output {output}: cannot create it ({e.strerror})") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output}: not writable")


def nll_by_passes_figure(report: dict):
    """One panel per learned setting (bars over 1..K side by side in one panel crowd their labels)."""
    plt = _pyplot()
    groups = nll_by_passes_bars(report)
    k = report["model"]["num_passes"]
    cols = min(len(groups), 3)
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(3.4 * cols + 0.6, 6.5), 2.9 * rows + 0.9), squeeze=False
    )
    top = max(nll for g in groups for _, nll, _ in g["bars"]) * 1.15
    for i, ax in enumerate(axes.flat):
        if i >= len(groups):
            ax.remove()
            continue
        passes, nlls, fractions = zip(*groups[i]["bars"])
        ax.bar(passes, nlls, 0.6, color="C0")
        for x, y, fraction in zip(passes, nlls, fractions):
            ax.annotate(
                share_label(fraction),
                (x, y),
                ha="center",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        ax.set_xticks(range(1, k + 1))
        ax.set_xlim(0.4, k + 0.6)
        ax.set_ylim(0, top)
        ax.set_title(groups[i]["label"], fontsize=9)
        if i % cols == 0:
            ax.set_ylabel("mean NLL (nats per token)", fontsize=9)
        if i >= len(groups) - cols:
            ax.set_xlabel("passes the token ran", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"Held-out NLL of tokens by the passes they ran ({model_description(report)})\n"
        "bar labels: share of tokens; no bar: no token ran that many passes",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def write_report(report: dict, output: str | Path) -> dict[str, Path | str]:
    """eval.json and the plots that have something to show. Returns each output's path, or for a
    plot not written, why; an earlier plot of that name in `output` is removed (it would describe
    another evaluation than the eval.json beside it)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / "eval.json"
    write_durable(json_path, json.dumps(report, indent=1))  # a full disk keeps the old results
    written: dict[str, Path | str] = {"json": json_path}
    figures = {
        "quality": (quality_figure, "quality_vs_compute.png"),
        "nll": (nll_by_passes_figure, "nll_by_passes.png"),
    }
    reasons = plots_to_write(report)
    if not all(reasons.values()):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(
                f"wrote {json_path}; the plots need matplotlib: pip install -e '.[eval]'"
            ) from None
    for key, (make, name) in figures.items():
        path = output / name
        if reasons[key]:
            path.unlink(missing_ok=True)
            written[key] = f"{name} not written: {reasons[key]}"
            continue
        fig = make(report)
        try:
            fig.savefig(path, dpi=110)
        finally:
            _pyplot().close(fig)
        written[key] = path
    return written


def format_report(report: dict) -> str:
    lines = []
    if report["points"]:
        lines += [
            "| policy | tau | cap | mean passes | NLL | ppl | compute vs K=1 | vs all K |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in report["points"]:
            tau = "-" if p["halt_threshold"] is None else f"{p['halt_threshold']:g}"
            lines.append(
                f"| {p['policy']} | {tau} | {p['max_passes'] or '-'} | {p['mean_passes']:.3f} "
                f"| {p['nll']:.4f} | {p['ppl']:.2f} "
                f"| {p['compute_vs_k1']:.3f} | {p['compute_vs_dense']:.3f} |"
            )
    for task, entries in report["tasks"].items():
        metric = primary_metric(entries[0]["metrics"])
        lines += [
            "",
            f"| {task} | tau | cap | {metric} | mean passes | compute vs K=1 | vs all K |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in entries:
            tau = "-" if e["halt_threshold"] is None else f"{e['halt_threshold']:g}"
            value = e["metrics"].get(metric, float("nan")) if metric else float("nan")
            lines.append(
                f"| {e['policy']} | {tau} | {e['max_passes'] or '-'} | {value:.4f} | {e['mean_passes']:.3f} "
                f"| {e['compute_vs_k1']:.3f} | {e['compute_vs_dense']:.3f} |"
            )
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


def _floats(text: str | None, flag: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None


def run(args: argparse.Namespace) -> dict:
    if args.data is None and not args.tasks:
        raise ValueError("nothing to evaluate: pass --data PREFIX and/or --tasks TASK,...")
    thresholds = _floats(args.sweep_threshold, "--sweep-threshold")
    policies = [p for p in (args.policies or "").split(",") if p]
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"--policies {policy!r}: expected a subset of {POLICIES}")
    caps = [int(c) for c in _floats(args.sweep_max_passes, "--sweep-max-passes")]
    model, tokenizer_path, described = load_model(args.model, args.tag)
    k = model.config.num_passes
    if any(not 0 <= t < 1 for t in thresholds):
        raise ValueError(f"--sweep-threshold {args.sweep_threshold}: every tau must lie in [0, 1)")
    if any(not 1 <= c <= k for c in caps):
        raise ValueError(f"--sweep-max-passes {args.sweep_max_passes}: every cap must lie in [1, {k}]")
    if (thresholds or policies) and not model.config.adaptive:
        raise ValueError(f"{args.model}: not an adaptive model; --sweep-threshold / --policies need gates")
    positions = model.config.max_position_embeddings
    if args.seq_len is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, positions)
    elif args.seq_len > positions:
        raise ValueError(
            f"--seq-len {args.seq_len} runs past the model's {positions} positions "
            f"(max_position_embeddings): pass --seq-len {positions} or less"
        )
    settings = learned_settings(model.config, thresholds, caps)
    model.to(args.device)
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {"model": described, "data": None, "points": [], "tasks": {}}
    if args.data is not None:
        windows, report["data"] = document_windows(
            args.data, args.seq_len, args.split, args.split_name, args.max_windows, model.config.vocab_size
        )
        report["points"] = perplexity_points(
            model, windows, settings, policies, args.batch_size, args.seed, progress=not args.no_progress
        )
    if args.tasks:
        tokenizer_path = args.tokenizer or tokenizer_path
        if tokenizer_path is None:
            raise ValueError(f"{args.model}: no tokenizer found; pass --tokenizer")
        options = {
            "include_path": args.include_path,
            "batch_size": args.batch_size,
            "limit": args.limit,
            "num_fewshot": args.num_fewshot,
            "seed": args.seed,
        }
        tasks = [t for t in args.tasks.split(",") if t]
        report["tasks"] = task_points(
            model, load_tokenizer(tokenizer_path), tasks, settings, policies, **options
        )
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaponder-eval",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("    adaponder-eval") : __doc__.index("Writes DIR")],
    )
    parser.add_argument(
        "model", help="run directory, export (adaponder-export), or Pythia / PonderLM HF directory"
    )
    parser.add_argument("--tag", help="checkpoint of a run directory, e.g. step-00001000 (default: latest)")
    parser.add_argument("--output", required=True, help="directory for eval.json and the plots")
    parser.add_argument("--data", help="MMIDIDX shard prefix for held-out perplexity")
    parser.add_argument(
        "--split", help="train/valid/test proportions as data.split, e.g. 949,50,1 (default: whole shard)"
    )
    parser.add_argument("--split-name", default="valid", choices=SPLITS, help="which range of --split")
    parser.add_argument(
        "--seq-len",
        type=int,
        help=f"tokens per window (default {DEFAULT_SEQ_LEN}, or the model's positions if fewer)",
    )
    parser.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", help="lm-eval tasks, comma-separated")
    parser.add_argument("--include-path", help="directory of local lm-eval task YAML files")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--limit", type=float, help="lm-eval: examples per task (or fraction if < 1)")
    parser.add_argument("--tokenizer", help="tokenizer for --tasks (default: the model's)")
    parser.add_argument("--sweep-threshold", help="further halting thresholds tau, comma-separated")
    parser.add_argument("--sweep-max-passes", help="further caps on passes per token, e.g. 1,2,3")
    parser.add_argument("--policies", help="fixed pruning at the learned mean passes: uniform,geometric")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    try:
        check_output_dir(args.output)  # before the evaluation, which can take hours
        report = run(args)
        paths = write_report(report, args.output)
    except ValueError as e:
        print(f"adaponder-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print("\n" + "\n".join(f"wrote {p}" if isinstance(p, Path) else p for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

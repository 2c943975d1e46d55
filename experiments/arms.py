"""The study's scale (full or smoke) and its arms, as run configs for `training/pretrain.py`.

Every arm of a seed trains on the same tokens in the same order with the same batch and learning-rate
schedule: only the model and the ponder settings differ. Seed s sets the model init (`seed`) and the
data order (`data.seed`), so the spread over seeds covers both.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scale:
    """Sizes of one version of the study."""

    name: str
    train_bytes: int  # corpus budget of the training packages
    valid_bytes: int  # corpus budget of the validation packages
    vocab_size: int  # BPE trained on the training split
    model: dict[str, Any]  # AdaPonderConfig overrides over the `tiny` preset (Pythia-shaped)
    seq_len: int
    batch_size: int  # samples per optimizer step (one rank, no accumulation)
    train_steps: int
    warmup: int  # steps of linear learning-rate warmup, then cosine to 0.1x
    lr: float
    stage1: int  # steps without the ponder loss (S0)
    ramp: int  # steps over which k rises to k_max (S1 - S0)
    checkpoint_interval: int
    seeds: tuple[int, ...]
    eval_windows: int  # validation windows of seq_len tokens (evenly spaced over the valid shard)
    eval_batch: int
    taus: tuple[float, ...]  # halting thresholds swept on the trained adaptive models (with fixed pruning)
    # Generated multi-step programs (experiments/corpus.py) added to the training split, and a
    # validation split of their own; 0: none.
    synthetic_train_bytes: int = 0
    synthetic_valid_bytes: int = 0
    # Questions per downstream task (experiments/downstream.py; needs the programs' validation split).
    task_examples: int = 0

    @property
    def tokens(self) -> int:
        return self.train_steps * self.batch_size * self.seq_len


FULL = Scale(
    name="full",
    train_bytes=24_000_000,
    valid_bytes=3_000_000,
    vocab_size=4096,
    model={
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 256,
    },
    seq_len=256,
    batch_size=4,
    train_steps=1000,
    warmup=20,
    lr=2e-3,
    stage1=500,
    ramp=200,
    checkpoint_interval=100,
    seeds=(1, 2, 3),
    eval_windows=128,
    eval_batch=16,
    taus=(1e-4, 1e-2, 0.1, 0.3, 0.5),
)

SMOKE = Scale(
    name="smoke",
    train_bytes=400_000,
    valid_bytes=60_000,
    vocab_size=512,
    model={
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
    },
    seq_len=64,
    batch_size=4,
    train_steps=8,
    warmup=2,
    lr=3e-3,
    stage1=4,
    ramp=2,
    checkpoint_interval=4,
    seeds=(1,),
    eval_windows=8,
    eval_batch=8,
    taus=(1e-4, 0.9, 0.99),  # gates start near 0.98 (gate_bias_init 4): 0.99 halts tokens early
    synthetic_train_bytes=60_000,
    synthetic_valid_bytes=20_000,
    task_examples=8,
)

# The regime pilot: more tokens per parameter than FULL (a narrower model and a smaller vocabulary,
# 2x the tokens: 2.45 tokens per parameter against 0.56) and a share of generated multi-step
# programs, trained for the vanilla and PonderLM arms only (`--arms vanilla,ponderlm`), evaluated on
# whole validation shards.
PILOT = Scale(
    name="pilot",
    train_bytes=24_000_000,
    valid_bytes=3_000_000,
    vocab_size=2048,
    model={
        "hidden_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 384,
        "max_position_embeddings": 256,
    },
    seq_len=256,
    batch_size=8,
    train_steps=1000,
    warmup=30,
    lr=2e-3,
    stage1=500,
    ramp=200,
    checkpoint_interval=100,
    seeds=(1, 2),
    eval_windows=0,  # every non-overlapping window of the shard
    eval_batch=16,
    taus=(1e-4,),
    synthetic_train_bytes=6_000_000,
    synthetic_valid_bytes=600_000,
)

# The second regime pilot, after the first showed PonderLM behind vanilla at 2.4 tokens per
# parameter with both still learning fast: a model whose backbone is too shallow for the generated
# programs (2 layers against PonderLM's 8 layer applications) and a 512-token vocabulary, so that
# 4.1M tokens are about 25 per parameter and capacity, not optimisation speed, limits both arms.
PILOT2 = dataclasses.replace(
    PILOT,
    name="pilot2",
    vocab_size=512,
    model={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "max_position_embeddings": 256,
    },
    train_steps=2000,
    warmup=40,
    stage1=1000,
    ramp=400,
)

SCALES = {s.name: s for s in (FULL, SMOKE, PILOT, PILOT2)}
PILOTS = ("pilot", "pilot2")

# Declared before the study's runs: "the same quality" means the 95% paired t interval (df = seeds - 1)
# of the validation-loss difference lies inside +-EQUIVALENCE_MARGIN nats (about 2% of perplexity).
EQUIVALENCE_MARGIN = 0.02
PASSES = 4  # K of every pondering arm


@dataclass(frozen=True)
class Arm:
    name: str
    label: str  # one line for the report
    model: dict[str, Any] = field(default_factory=dict)  # AdaPonderConfig overrides of this arm
    ponder: dict[str, Any] = field(default_factory=dict)  # PonderConfig fields of this arm
    optimizer: dict[str, Any] = field(default_factory=dict)

    @property
    def adaptive(self) -> bool:
        return bool(self.model.get("adaptive"))


def dense_flops_per_token(scale: Scale, **model: Any) -> float:
    """Forward FLOPs per token of a `seq_len` window with every pass run (the model's own count)."""
    import torch

    from model import AdaPonderConfig
    from model.accounting import forward_flops

    config = AdaPonderConfig.from_preset("tiny", vocab_size=scale.vocab_size, **{**scale.model, **model})
    active_KBT = torch.ones(config.num_passes, 1, scale.seq_len, dtype=torch.bool)
    flops = forward_flops(config, active_KBT, torch.ones(1, scale.seq_len, dtype=torch.bool))
    return float(flops["dense_total"]) / scale.seq_len


@functools.cache
def matched_depth(scale_name: str) -> int:
    """Layers of a one-pass model whose FLOPs per token come closest to PonderLM K's.

    More than K x the layers: PonderLM also pays head + mixture (4 D V) between passes.
    """
    scale = SCALES[scale_name]
    target = dense_flops_per_token(scale, num_passes=PASSES, adaptive=False)
    depths = range(1, 16 * scale.model["num_hidden_layers"])
    return min(
        depths,
        key=lambda n: abs(
            dense_flops_per_token(scale, num_passes=1, adaptive=False, num_hidden_layers=n) - target
        ),
    )


def arms(scale: Scale) -> list[Arm]:
    """The training arms, cheapest first within a seed."""
    depth = matched_depth(scale.name)
    ada = {"num_passes": PASSES, "adaptive": True}
    return [
        Arm("vanilla", "vanilla K=1", {"num_passes": 1, "adaptive": False}),
        Arm(
            "vanilla-deep",
            f"vanilla K=1, {depth} layers (PonderLM K={PASSES}'s FLOPs per token)",
            {"num_passes": 1, "adaptive": False, "num_hidden_layers": depth},
        ),
        Arm("ponderlm", f"PonderLM K={PASSES}", {"num_passes": PASSES, "adaptive": False}),
        Arm(
            "adaponder",
            "AdaPonderLM, paper defaults (lambda 0.1, k_max 0.1, tau 1e-4), gate lr x0.1",
            ada,
            {"k_max": 0.1},
        ),
        Arm(
            "adaponder-hold",
            "AdaPonderLM, paper defaults, halting held off in stage 1, gate lr x1",
            ada,
            {"k_max": 0.1, "halt_during_stage1": False},
            {"gate_lr_multiplier": 1.0},
        ),
        Arm("adaponder-k0.3", "AdaPonderLM, k_max 0.3, gate lr x0.1", ada, {"k_max": 0.3}),
    ]


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


def run_config(arm: Arm, seed: int, scale: Scale, run_dir: str, data: dict[str, str]) -> dict[str, Any]:
    """The run config (as YAML-able dict) of one arm and seed; `data` holds train/valid/tokenizer paths."""
    return {
        "run_dir": run_dir,
        "model": {
            "preset": "tiny",
            "init": "ponderlm",
            "overrides": {"vocab_size": scale.vocab_size, **scale.model, **arm.model},
        },
        "data": {
            "train_paths": [data["train"]],
            "valid_paths": [data["valid"]],
            "tokenizer": data["tokenizer"],
            "seed": 1000 + seed,
            "num_workers": 0,
        },
        "optimizer": {"lr": scale.lr, **arm.optimizer},
        "schedule": {"unit": "steps", "warmup": scale.warmup, "min_lr_ratio": 0.1},
        "ponder": {
            "unit": "steps",
            "loss_weight": 0.1,
            "start": scale.stage1,
            "ramp": scale.ramp,
            **arm.ponder,
        },
        "checkpoint": {"interval": scale.checkpoint_interval, "keep_last": 1},
        "logging": {
            "log_interval": max(1, scale.train_steps // 20),
            "eval_interval": scale.train_steps,
            "eval_samples": scale.batch_size * 8,
            "progress_bar": False,
            "peak_tflops": 0.1,
        },
        "seq_len": scale.seq_len,
        "micro_batch_size": scale.batch_size,
        "global_batch_size": scale.batch_size,
        "train_steps": scale.train_steps,
        "precision": "fp32",
        "deepspeed_config": "ds_configs/zero3.json",  # the default users run (1 rank: nothing to partition)
        "seed": seed,
    }

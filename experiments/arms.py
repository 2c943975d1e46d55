"""The study's scales (full, smoke, the regime pilots) and its arms, as run configs for
`training/pretrain.py`.

Every from-scratch arm of a seed trains on the same tokens in the same order with the same batch and
learning-rate schedule: only the model and the ponder settings differ. Seed s sets the model init
(`seed`) and the data order (`data.seed`), so the spread over seeds covers both. A continued arm
starts from the final weights of its seed's source arm and reads the samples that follow the ones
its source read (`data.start_sample`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Literal


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
    # The sweep set (experiments/evaluate.py): windows over both validation shards, and what is swept.
    sweep_windows: int = 256
    pass_grid: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 3.5)  # fixed pruning of plain PonderLM
    confidences: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # confidence exit of plain PonderLM
    draws: int = 5  # random exit assignments per fixed-pruning point

    @property
    def tokens(self) -> int:
        return self.train_steps * self.batch_size * self.seq_len


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
    sweep_windows=8,
    pass_grid=(2.0,),
    confidences=(0.5,),
    draws=2,
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

# The study: pilot 2's regime (where PonderLM beat vanilla by 0.11 nats paired), 3 seeds, every
# arm. Its vanilla and PonderLM K=4 runs of seeds 1 and 2 are the pilot's own (same configs, same data
# bytes: experiments/README.md says how they were carried over).
FULL = dataclasses.replace(
    PILOT2,
    name="full",
    seeds=(1, 2, 3),
    taus=(1e-4, 1e-2, 0.1, 0.3, 0.5),
    task_examples=200,
)

SCALES = {s.name: s for s in (FULL, SMOKE, PILOT, PILOT2)}
PILOTS = ("pilot", "pilot2")

# Declared before the study's runs: "the same quality" means the 95% paired t interval (df = seeds - 1)
# of the validation-loss difference lies inside +-EQUIVALENCE_MARGIN nats (about 2% of perplexity).
EQUIVALENCE_MARGIN = 0.02
PASSES = 4  # K of the PonderLM and AdaPonderLM arms (K=2 and K=3 are fixed-depth points beside them)
DEEP_LRS = (1.0, 0.5)
# The adaptive arms and the plain PonderLM whose training-free exits (fixed pruning, confidence) they
# are compared with at equal FLOPs: same training tokens (AdaPonderLM from scratch against PonderLM;
# the continued one against PonderLM continued as long without gates). Only these plain arms are swept.
EXIT_BASELINES = {
    "adaponder": "ponderlm",
    "adaponder-cont": "ponderlm-more",
}  # the deep vanilla's two learning rates, as multiples of the scale's


@dataclass(frozen=True)
class Arm:
    name: str
    label: str  # one line for the report
    model: dict[str, Any] = field(default_factory=dict)  # AdaPonderConfig overrides of this arm
    ponder: dict[str, Any] = field(default_factory=dict)  # PonderConfig fields of this arm
    optimizer: dict[str, Any] = field(default_factory=dict)
    init: str = "ponderlm"  # model.init of a from-scratch arm
    # The arm (same seed) whose final weights this one continues from; None: from scratch.
    continues: str | None = None
    # Which of the scale's seeds run this arm: all; only the first (learning-rate tuning and one-seed
    # checks); all but the first (an arm whose first seed is the best of its `tuned_by` arms).
    seeds: Literal["all", "first", "rest"] = "all"
    # Tuning arms of the first seed: this arm's first seed is the one of them with the lowest final
    # validation loss (the trainer's own evaluation), and its other seeds train with that one's lr.
    tuned_by: tuple[str, ...] = ()

    @property
    def adaptive(self) -> bool:
        return bool(self.model.get("adaptive"))

    def runs_on(self, seed: int, scale: Scale) -> bool:
        first = seed == scale.seeds[0]
        return self.seeds == "all" or (self.seeds == "first") == first


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
def parameters(scale_name: str) -> int:
    """Parameters of the scale's plain (gate-free) model, counted on the meta device."""
    import torch

    from model import AdaPonderConfig, AdaPonderForCausalLM

    scale = SCALES[scale_name]
    config = AdaPonderConfig.from_preset("tiny", vocab_size=scale.vocab_size, **scale.model, adaptive=False)
    with torch.device("meta"):
        return sum(p.numel() for p in AdaPonderForCausalLM(config).parameters())


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


def continued_lr(scale: Scale) -> float:
    """Peak learning rate of a continued arm: a quarter of the from-scratch runs'."""
    return scale.lr / 4


def continued_steps(scale: Scale) -> int:
    """Steps of a continued arm: half its source's (gates only for 2/5 of them, then jointly)."""
    return max(2, scale.train_steps // 2)


def arms(scale: Scale) -> list[Arm]:
    """The training arms, sources before the arms that continue them, cheapest first otherwise."""
    depth = matched_depth(scale.name)
    fixed = {"adaptive": False}
    ada = {"num_passes": PASSES, "adaptive": True}
    deep = {"num_passes": 1, "adaptive": False, "num_hidden_layers": depth}
    deep_label = f"vanilla K=1, {depth} layers (PonderLM K={PASSES}'s FLOPs per token)"
    tuning = [
        Arm(
            f"vanilla-deep-lr{m:g}",
            f"{deep_label}, lr x{m:g} (tuning, first seed)",
            deep,
            optimizer={"lr": scale.lr * m},
            seeds="first",
        )
        for m in DEEP_LRS
    ]
    steps = continued_steps(scale)
    gates = steps * 2 // 5
    continued = {"gates_only": gates, "backbone_warmup": steps // 10, "start": 0, "ramp": gates}
    return [
        Arm("vanilla", "vanilla K=1", {"num_passes": 1, **fixed}),
        Arm("ponderlm-k2", "PonderLM K=2", {"num_passes": 2, **fixed}),
        Arm("ponderlm-k3", "PonderLM K=3", {"num_passes": 3, **fixed}),
        Arm("ponderlm", f"PonderLM K={PASSES}", {"num_passes": PASSES, **fixed}),
        Arm(
            "adaponder",
            "AdaPonderLM from scratch, paper defaults (lambda 0.1, k_max 0.1, tau 1e-4), gate lr x0.1",
            ada,
            {"k_max": 0.1},
        ),
        Arm(
            "ponderlm-more",
            f"PonderLM K={PASSES} continued {steps} steps without gates (the control of adaponder-cont)",
            {"num_passes": PASSES, **fixed},
            continues="ponderlm",
        ),
        Arm(
            "adaponder-cont",
            f"AdaPonderLM continued from PonderLM K={PASSES}: gates only for {gates} steps, then "
            f"jointly to {steps} (the paper's 1.4B/2.8B recipe), gate lr x1",
            ada,
            {"k_max": 0.1, **continued},
            {"gate_lr_multiplier": 1.0},
            continues="ponderlm",
        ),
        *tuning,
        Arm("vanilla-deep", deep_label, deep, seeds="rest", tuned_by=tuple(a.name for a in tuning)),
        Arm(
            "ponderlm-pythia-init",
            f"PonderLM K={PASSES}, Pythia's init (first seed)",
            {"num_passes": PASSES, **fixed},
            init="pythia",
            seeds="first",
        ),
    ]


def jobs(
    scale: Scale, names: list[str] | None = None, seeds: list[int] | None = None
) -> list[tuple[Arm, int]]:
    """(arm, seed) of every run of the scale, seed by seed, optionally only some arms or seeds."""
    return [
        (arm, seed)
        for seed in seeds or scale.seeds
        for arm in arms(scale)
        if arm.runs_on(seed, scale) and (names is None or arm.name in names)
    ]


def arm_named(scale: Scale, name: str) -> Arm:
    return next(arm for arm in arms(scale) if arm.name == name)


def train_steps(arm: Arm, scale: Scale) -> int:
    return continued_steps(scale) if arm.continues else scale.train_steps


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


def run_config(
    arm: Arm,
    seed: int,
    scale: Scale,
    run_dir: str,
    data: dict[str, str],
    source: str | None = None,
    lr: float | None = None,
) -> dict[str, Any]:
    """The run config (as YAML-able dict) of one arm and seed; `data` holds train/valid/tokenizer paths.

    A continued arm starts from `source` (an exported Hugging Face directory of its source run) at a
    quarter of the scale's peak learning rate; `lr` (a tuned arm's choice) overrides the arm's own.
    """
    steps = train_steps(arm, scale)
    overrides = {"vocab_size": scale.vocab_size, **scale.model, **arm.model}
    model: dict[str, Any] = {"preset": "tiny", "init": arm.init, "overrides": overrides}
    data_order: dict[str, Any] = {"seed": 1000 + seed}
    peak = scale.lr
    if arm.continues:
        assert source is not None, f"{arm.name} continues {arm.continues}: its source directory is needed"
        model = {"init_from": source, "overrides": dict(arm.model)}
        # The samples its source would have read next: the same order, past its source's steps.
        data_order["start_sample"] = scale.train_steps * scale.batch_size
        peak = continued_lr(scale)
    optimizer = {"lr": peak, **arm.optimizer}
    if lr is not None:
        optimizer["lr"] = lr
    return {
        "run_dir": run_dir,
        "model": model,
        "data": {
            "train_paths": [data["train"]],
            "valid_paths": [data["valid"]],
            "tokenizer": data["tokenizer"],
            **data_order,
            "num_workers": 0,
        },
        "optimizer": optimizer,
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
            "log_interval": max(1, steps // 20),
            "eval_interval": steps,
            "eval_samples": scale.batch_size * 8,
            "progress_bar": False,
            "peak_tflops": 0.1,
        },
        "seq_len": scale.seq_len,
        "micro_batch_size": scale.batch_size,
        "global_batch_size": scale.batch_size,
        "train_steps": steps,
        "precision": "fp32",
        "deepspeed_config": "ds_configs/zero3.json",  # the default users run (1 rank: nothing to partition)
        "seed": seed,
    }

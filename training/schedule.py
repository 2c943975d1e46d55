"""Learning-rate and ponder-loss schedules: pure functions of the run's progress.

Progress is counted *including* the step about to be taken (step 1 is the first), in optimizer steps
or in tokens as each config's `unit` says. Tokens are the consumed tokens, so a schedule in tokens
stays put when the global batch size changes between restarts. Nothing here has state to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from training.config import BatchPlan, PonderConfig, RunConfig, ScheduleConfig, ScheduleUnit


@dataclass(frozen=True)
class StepSettings:
    """What one optimizer step uses."""

    lr: float  # the schedule's learning rate: the backbone's outside the gates-only phase and re-warm
    backbone_lr: float  # 0 during the gates-only phase of continued pretraining, then re-warmed
    gates_only: bool  # the backbone is frozen for this step (its parameters need no gradient)
    gate_lr: float  # lr x optimizer.gate_lr_multiplier
    ponder_lambda: float  # weight of the bottom-k gate loss; 0 in stage 1
    ponder_k: float  # fraction of gate values in the bottom-k mean


def learning_rate(cfg: ScheduleConfig, peak: float, progress: int, end: int) -> float:
    """Linear warmup to `peak`, cosine to `min_lr_ratio * peak` at `decay_end` (default `end`)."""
    if cfg.warmup and progress <= cfg.warmup:
        return peak * progress / cfg.warmup
    decay_end = cfg.decay_end or end
    floor = peak * cfg.min_lr_ratio
    if progress >= decay_end:
        return floor
    frac = (progress - cfg.warmup) / (decay_end - cfg.warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * frac))


def ponder_weights(cfg: PonderConfig, progress: int) -> tuple[float, float]:
    """(lambda, k): 0 through stage 1, then k rises linearly to k_max over `ramp` (docs/method.md)."""
    if progress <= cfg.start:
        return 0.0, 0.0
    ramped = 1.0 if cfg.ramp == 0 else min(1.0, (progress - cfg.start) / cfg.ramp)
    return cfg.loss_weight, cfg.k_max * ramped


def backbone_lr_factor(cfg: PonderConfig, progress: int) -> float:
    """0 through the gates-only phase, then a linear re-warm to 1 over `backbone_warmup`.

    The backbone's Adam moments are still empty when the phase ends, so the first updates would
    otherwise be ~lr-sized steps in the sign of a single gradient, at the schedule's full lr.
    """
    if progress <= cfg.gates_only:
        return 0.0
    if not cfg.gates_only or not cfg.backbone_warmup:
        return 1.0
    return min(1.0, (progress - cfg.gates_only) / cfg.backbone_warmup)


class Schedules:
    """The settings of every step of one run."""

    def __init__(self, cfg: RunConfig, plan: BatchPlan):
        self._cfg = cfg
        self._total = {"steps": plan.train_steps, "tokens": plan.train_steps * plan.tokens_per_step}

    def at(self, step: int, tokens: int) -> StepSettings:
        """Settings of optimizer step `step` (1-based), which ends with `tokens` consumed tokens."""
        cfg = self._cfg

        def progress(unit: ScheduleUnit) -> int:
            return step if unit == "steps" else tokens

        unit = cfg.schedule.unit
        lr = learning_rate(cfg.schedule, cfg.optimizer.lr, progress(unit), self._total[unit])
        ponder_progress = progress(cfg.ponder.unit)
        gates_only = ponder_progress <= cfg.ponder.gates_only
        lam, k = ponder_weights(cfg.ponder, ponder_progress)
        return StepSettings(
            lr=lr,
            backbone_lr=lr * backbone_lr_factor(cfg.ponder, ponder_progress),
            gates_only=gates_only,
            gate_lr=lr * cfg.optimizer.gate_lr_multiplier,
            ponder_lambda=lam,
            ponder_k=k,
        )

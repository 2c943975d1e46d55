"""Compute accounting: forward FLOPs, decode bytes and halting statistics of a batch, by part.

The unit is one vanilla backbone pass over one token; a token that halted after pass i cost i + 1
passes. Everything here reads the activity masks m^i [K, B, T] a forward returns.
"""

from __future__ import annotations

import torch

from model.config import AdaPonderConfig


def forward_flops(
    config: AdaPonderConfig,
    active_KBT: torch.Tensor,
    real_BT: torch.Tensor,
    past_real_B: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Forward FLOPs of this batch as run adaptively (halted tokens computed nowhere), by part.

    `past_real_B` counts real tokens already in a KV cache: they lengthen every query's context.
    The counts are taken from the masks here; `flops_from_counts` has the cost model.
    """
    active = (active_KBT & real_BT).double()
    context_BT = real_BT.double().cumsum(-1)
    if past_real_B is not None:
        context_BT = context_BT + past_real_B.double()[:, None]
    return flops_from_counts(
        config,
        active_KBT.shape[0],
        active_KBT.device,
        run=active.sum(),
        run_context=(active * context_BT).sum(),
        mixed=active[1:].sum(),
        gated=active[:-1].sum(),
        real=real_BT.double().sum(),
        real_context=(real_BT.double() * context_BT).sum(),
    )


Count = float | torch.Tensor  # a host number, or a 0-d float64 tensor on the device


def flops_from_counts(
    config: AdaPonderConfig,
    k: int,
    device: torch.device,
    run: Count,
    run_context: Count,
    mixed: Count,
    gated: Count,
    real: Count,
    real_context: Count,
) -> dict[str, torch.Tensor]:
    """Forward FLOPs by part, as float64 tensors on `device`, of K = `k` passes from token counts:
    `run` token-passes run and `run_context` the sum of their causal contexts (real keys, itself
    included), `mixed` and `gated` the token-passes preceded by a mixture and followed by a gate,
    `real` tokens and `real_context` the sum of their contexts.

    Matmul FLOPs only (2 per multiply-add). A token active in pass i pays one backbone pass plus
    attention over its causal context of real keys; a gate is evaluated after every pass but the
    last; head + mixture (4 D V) are paid only by tokens that go on to the next pass; the final
    head (2 D V) once per token. `dense_total` is the same batch with every token in every pass.
    """
    d, v, g = config.hidden_size, config.vocab_size, config.gate_intermediate_size
    num_layers = config.num_hidden_layers
    per_backbone = 2 * num_layers * (4 * d * d + 2 * d * config.intermediate_size)
    per_gate = 2 * (d * g + g) if config.adaptive else 0
    parts = {
        "backbone": run * per_backbone,
        "attention": run_context * 4 * num_layers * d,
        "head": real * 2 * d * v,
        "mixture": mixed * 4 * d * v,
        "gates": gated * per_gate,
    }
    parts["total"] = sum(parts.values())
    parts["dense_total"] = (
        real * k * per_backbone
        + k * real_context * 4 * num_layers * d
        + real * 2 * d * v
        + (k - 1) * real * (4 * d * v + per_gate)
    )
    return {name: torch.as_tensor(value, dtype=torch.float64, device=device) for name, value in parts.items()}


def one_token_step_stats(
    config: AdaPonderConfig, passes: int, past_real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`halting_stats` and `forward_flops` of a decode step at batch 1 that ran `passes` passes
    (a host int) after `past_real` cached real tokens (0-d): host arithmetic and a few small
    tensors, where the mask route costs 5% of a K = 1 step on CPU."""
    k, device = config.num_passes, past_real.device
    context = past_real.double() + 1
    flops = flops_from_counts(
        config,
        k,
        device,
        run=passes,
        run_context=passes * context,
        mixed=passes - 1,
        gated=min(passes, k - 1),
        real=1,
        real_context=context,
    )
    passes_11 = torch.full((1, 1), passes, dtype=torch.long, device=device)
    halted_K = torch.tensor([float(i == passes - 1) for i in range(k)], dtype=torch.float64, device=device)
    return passes_11, halted_K, torch.tensor(float(passes), dtype=torch.float64, device=device), flops


def decode_bytes(
    config: AdaPonderConfig,
    active_KBT: torch.Tensor,
    context_BT: torch.Tensor,
    element_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Bytes a batch-1 decode of these tokens reads, by part, summed over the tokens (each decoded
    alone: a step of a batch reads the weights once for all its rows), as `forward_flops` counts
    work: a token active in pass i reads one backbone (every layer's weights and biases, the final
    norm) and the cached K/V of pass i over its context (`context_BT`: cached real positions,
    itself included); a gate after every pass but the last; the head and the embedding table for
    each mixture (tokens going on to the next pass); the head once more for the final logits; one
    row of the embedding table. `element_size`: bytes per weight (4 for fp32)."""
    d, v, g = config.hidden_size, config.vocab_size, config.gate_intermediate_size
    layer = 4 * d * d + 4 * d + 2 * d * config.intermediate_size + config.intermediate_size + d + 4 * d
    backbone = config.num_hidden_layers * layer + 2 * d
    gate = (d * g + 2 * g + 1) if config.adaptive else 0
    active = active_KBT.double()
    tokens = active[0].sum()
    parts = {
        "backbone": active.sum() * backbone,
        "kv_cache": (active * context_BT.double()).sum() * 2 * config.num_hidden_layers * d,
        "gates": active[:-1].sum() * gate,
        "head": tokens * v * d,
        "mixture": active[1:].sum() * 2 * v * d,
        "embedding": tokens * d,
    }
    parts = {name: value * element_size for name, value in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def active_from_passes(passes_BT: torch.Tensor, num_passes: int) -> torch.Tensor:
    """The monotonic activity mask m^i [K, B, T] of tokens that ran `passes_BT` passes."""
    return passes_BT[None] > torch.arange(num_passes, device=passes_BT.device)[:, None, None]


def halting_stats(active_KBT: torch.Tensor, real_BT: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Passes per position [B, T], fraction of real tokens whose last pass is j [K], mean passes."""
    passes_BT = active_KBT.sum(0)
    n_real = real_BT.sum().clamp(min=1)
    # One-hot of the last pass by comparison: F.one_hot checks its range on the host.
    last_pass_KBT = (passes_BT - 1)[None] == torch.arange(active_KBT.shape[0], device=passes_BT.device)[
        :, None, None
    ]
    halted_K = (last_pass_KBT & real_BT).sum((1, 2)).double() / n_real
    mean = (passes_BT * real_BT).sum().double() / n_real
    return passes_BT, halted_K, mean

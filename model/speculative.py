"""Self-speculative decoding: pass 1 of the pondering model drafts, its remaining passes verify.

A pondering model carries its own draft model: its first pass. One cycle:
  1. Draft n tokens, one decode step each (model.ponder.decode_step), running pass 1 only. Their
     pass-1 K/V are exactly those the full computation needs; the cache carries them into the later
     passes, as for a token that halts after pass 1.
  2. Verify: the n drafted positions become the cache's current chunk again (`reopen_chunk`) and the
     packed loop (model.ponder.ponder_packed) goes on from their pass-1 outputs h^0: gate, mixture,
     passes 2..K for the tokens that continue, all n positions in one batched call. A token the gate
     halts after pass 1 is computed no further: its draft logits are its final logits (always accepted).
  3. Accept the longest prefix the full model agrees with, plus the full model's own token at the
     first disagreement, and crop the cache back to the accepted positions.

Greedy: the full model's argmax tokens, as plain greedy decoding: the same computation, except that
the verify batches n positions where plain decoding runs one, so logits and gate values agree to
float rounding rather than bitwise; only an argmax near-tie or a gate value within rounding of tau
could tell them apart (never seen in the tests or the benchmark, which compare token for token).
Sampling: the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept draft x
with probability min(1, p(x) / q(x)), else resample from norm(max(0, p - q)); every emitted token is
distributed as plain sampling's, after the same logits processors (temperature, top-k/p, ...).

Batches: the cache holds one length for every sequence, so a cycle keeps the shortest accepted
prefix among the unfinished sequences (each sequence's first m tokens are valid under either rule;
the rest is discarded and redrafted). Speculation pays most at batch size 1.

Entry points: `generate(..., assistant_early_exit=1, num_assistant_tokens=n)` (transformers'
early-exit assisted decoding arguments; modeling.py routes its `_assisted_decoding` here) and
`speculative_loop` (what it runs after the prefill, returning acceptance statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model.inference import AdaPonderCache
from model.ponder import decode_applies


@dataclass
class SpeculationStats:
    """Tokens drafted and drafts the full model agreed with (summed over unfinished sequences),
    tokens each sequence emitted in the cycles (the kept prefix after the batch minimum; the token
    after the prefill not counted) and cycles."""

    drafted: int = 0
    agreed: int = 0
    emitted: int = 0
    cycles: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.agreed / max(self.drafted, 1)

    @property
    def tokens_per_cycle(self) -> float:
        return self.emitted / max(self.cycles, 1)


def check_generation_config(
    generation_config: Any, assistant_model: Any, model_kwargs: dict[str, Any]
) -> int:
    """The draft length n of an early-exit assisted generate() call; a ValueError for what the
    self-speculative path does not do."""
    if assistant_model is not None:
        raise ValueError("assistant_model: AdaPonderLM drafts with its own pass 1 (assistant_early_exit=1)")
    if generation_config.assistant_early_exit != 1:
        exit_pass = generation_config.assistant_early_exit
        raise ValueError(f"assistant_early_exit must be 1 (draft with pass 1), got {exit_pass}")
    if generation_config.num_assistant_tokens_schedule != "constant":
        raise ValueError("num_assistant_tokens_schedule: self-speculative decoding drafts a constant number")
    if generation_config.return_dict_in_generate:
        raise ValueError("return_dict_in_generate is not supported with assistant_early_exit")
    if model_kwargs.get("exit_passes") is not None:
        raise ValueError("exit_passes cannot be combined with assistant_early_exit")
    n = generation_config.num_assistant_tokens
    if n is None or int(n) < 1:
        raise ValueError(f"num_assistant_tokens must be >= 1, got {n}")
    return int(n)


def assisted_decoding(
    model: Any,
    input_ids: torch.Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    streamer: Any = None,
    assistant_model: Any = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """transformers' `_assisted_decoding` for an AdaPonderForCausalLM with assistant_early_exit=1:
    the same prefill as plain decoding, then `speculative_loop`. Returns the sequences."""
    num_draft = check_generation_config(generation_config, assistant_model, model_kwargs)
    tau, num_run = model.compute_knob(model_kwargs.get("halt_threshold"), model_kwargs.get("max_passes"))
    outputs = model.prefill(input_ids, generation_config, model_kwargs)
    sequences, _ = speculative_loop(
        model,
        input_ids,
        outputs.cache,
        outputs.logits[:, -1],
        num_draft,
        logits_processor,
        stopping_criteria,
        do_sample=generation_config.do_sample,
        pad_token_id=generation_config._pad_token_tensor,
        tau=tau,
        num_run=num_run,
        streamer=streamer,
    )
    if streamer is not None:
        streamer.end()
    return sequences


@torch.no_grad()
def speculative_loop(
    model: Any,
    input_ids_BL: torch.Tensor,
    cache: AdaPonderCache,
    logits_BV: torch.Tensor,
    num_draft: int,
    logits_processor: Any,
    stopping_criteria: Any,
    do_sample: bool,
    pad_token_id: torch.Tensor | None,
    tau: float,
    num_run: int,
    streamer: Any = None,
) -> tuple[torch.Tensor, SpeculationStats]:
    """Generate after a prefill: `cache` holds every position of `input_ids_BL` but the last,
    `logits_BV` are the last position's. Returns the sequences and the acceptance statistics."""
    stats = SpeculationStats()
    unfinished_B = torch.ones(input_ids_BL.shape[0], dtype=torch.bool, device=input_ids_BL.device)
    has_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    emit = _Emitter(stopping_criteria, pad_token_id if has_eos else None, streamer)
    scores_BV = logits_processor(input_ids_BL, logits_BV.to(copy=True, dtype=torch.float32))
    first_B = torch.multinomial(scores_BV.softmax(-1), 1)[:, 0] if do_sample else scores_BV.argmax(-1)
    input_ids_BL, unfinished_B = emit(input_ids_BL, first_B, unfinished_B)
    max_length = stopping_criteria.max_length
    while bool(unfinished_B.any()):
        n = num_draft if max_length is None else min(num_draft, max_length - input_ids_BL.shape[1])
        tokens_BN, keep = _cycle(
            model, input_ids_BL, cache, n, logits_processor, do_sample, tau, num_run, unfinished_B, stats
        )
        for j in range(keep):
            input_ids_BL, unfinished_B = emit(input_ids_BL, tokens_BN[:, j], unfinished_B)
            if not bool(unfinished_B.any()):
                break
        cache.crop(input_ids_BL.shape[1] - 1)  # the last token is fed by the next cycle
    return input_ids_BL, stats


class _Emitter:
    """Appends one token per sequence as plain decoding does: padding after a sequence finished,
    then the stopping criteria (EOS, max length)."""

    def __init__(self, stopping_criteria: Any, pad_token_id: torch.Tensor | None, streamer: Any) -> None:
        self.stopping_criteria, self.pad_token_id, self.streamer = stopping_criteria, pad_token_id, streamer

    def __call__(
        self, input_ids_BL: torch.Tensor, token_B: torch.Tensor, unfinished_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pad_token_id is not None:
            token_B = torch.where(unfinished_B, token_B, self.pad_token_id.to(token_B.device))
        input_ids_BL = torch.cat([input_ids_BL, token_B[:, None]], dim=-1)
        if self.streamer is not None:
            self.streamer.put(token_B.cpu())
        return input_ids_BL, unfinished_B & ~self.stopping_criteria(input_ids_BL, None)


def _cycle(
    model: Any,
    input_ids_BL: torch.Tensor,
    cache: AdaPonderCache,
    n: int,
    logits_processor: Any,
    do_sample: bool,
    tau: float,
    num_run: int,
    unfinished_B: torch.Tensor,
    stats: SpeculationStats,
) -> tuple[torch.Tensor, int]:
    """Draft n tokens with pass 1, verify them with the full model; returns the tokens to emit
    [B, n] (the first `keep` columns are valid for every unfinished sequence) and `keep`."""
    length = input_ids_BL.shape[1]
    ids_BL, h0, q_scores = input_ids_BL, [], []
    for _ in range(n):
        h0.append(_draft(model, ids_BL[:, -1:], cache, tau))
        scores_BV = logits_processor(ids_BL, model.embed_out(h0[-1][:, -1]).float())
        draft_B = torch.multinomial(scores_BV.softmax(-1), 1)[:, 0] if do_sample else scores_BV.argmax(-1)
        q_scores.append(scores_BV)
        ids_BL = torch.cat([ids_BL, draft_B[:, None]], dim=-1)
    result = _cached_call(model, ids_BL[:, length - 1 : -1], cache, tau, num_run, torch.cat(h0, 1))
    logits_BNV = model.embed_out(result.h_out).float()
    # The prefix of position j is the drafted one, which is the emitted one wherever it is used.
    p_scores = [logits_processor(ids_BL[:, : length + j], logits_BNV[:, j]) for j in range(n)]
    drafts_BN = ids_BL[:, length:]
    if do_sample:
        agreed_B, tokens_BN = accept_sampled(torch.stack(p_scores, 1), torch.stack(q_scores, 1), drafts_BN)
    else:
        tokens_BN = torch.stack(p_scores, 1).argmax(-1)
        agreed_B = (drafts_BN == tokens_BN).long().cumprod(-1).sum(-1)
    keep = int((agreed_B[unfinished_B] + 1).clamp(max=n).min())
    count = int(unfinished_B.sum())
    stats.cycles += 1
    stats.drafted += n * count
    stats.agreed += int(agreed_B[unfinished_B].sum())
    stats.emitted += keep
    return tokens_BN, keep


def accept_sampled(
    p_scores_BNV: torch.Tensor, q_scores_BNV: torch.Tensor, drafts_BN: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule on processed scores (log-space, -inf allowed) of the full model
    (p) and the draft (q) at n drafted positions. Returns the accepted prefix length a [B] and the
    tokens [B, n]: the drafts before a, a sample of norm(max(0, p - q)) at a, drafts after (unused)."""
    p_BNV, q_BNV = p_scores_BNV.softmax(-1), q_scores_BNV.softmax(-1)
    p_BN = p_BNV.gather(-1, drafts_BN[..., None])[..., 0]
    q_BN = q_BNV.gather(-1, drafts_BN[..., None])[..., 0]
    # u < p / q, written without the division; q(x) > 0 since x was drawn from q.
    accepted_BN = torch.rand_like(p_BN) * q_BN < p_BN
    agreed_B = accepted_BN.long().cumprod(-1).sum(-1)
    b, n, _ = p_BNV.shape
    at_B = agreed_B.clamp(max=n - 1)
    rows = torch.arange(b, device=p_BNV.device)
    residual_BV = (p_BNV[rows, at_B] - q_BNV[rows, at_B]).clamp(min=0)
    mass_B1 = residual_BV.sum(-1, keepdim=True)
    # p == q up to rounding: rejection has probability 0; p itself is the exact fallback.
    residual_BV = torch.where(mass_B1 > 0, residual_BV, p_BNV[rows, at_B])
    correction_B = torch.multinomial(residual_BV, 1)[:, 0]
    tokens_BN = drafts_BN.clone()
    rejected_B = agreed_B < n
    tokens_BN[rows[rejected_B], at_B[rejected_B]] = correction_B[rejected_B]
    return agreed_B, tokens_BN


def _draft(model: Any, ids_B1: torch.Tensor, cache: AdaPonderCache, tau: float) -> torch.Tensor:
    """Pass 1 of one new token per sequence, cached as for a token that halts after it; its output
    h^0 [B, 1, D]. Through the decode step (model.ponder.decode_step) where it applies, else the
    general path."""
    if not decode_applies(model, cache, 1, True, None, None):
        return _cached_call(model, ids_B1, cache, tau, 1).h_out
    position_ids_B1 = cache.real.sum(-1)[:, None]  # real tokens before it (left padding excluded)
    return model.decode(ids_B1, position_ids_B1, cache, tau, 1).h_out


def _cached_call(
    model: Any,
    ids_BT: torch.Tensor,
    cache: AdaPonderCache,
    tau: float,
    num_run: int,
    pass0_h_BTD: torch.Tensor | None = None,
) -> Any:
    """One cached forward of real tokens at the next positions (model.ponder.PonderResult): new
    positions running `num_run` passes, or with `pass0_h_BTD` the cache's last T positions, whose
    pass 1 ran already, going on from its outputs."""
    real_BT = torch.ones_like(ids_BT, dtype=torch.bool)
    t = ids_BT.shape[1]
    if pass0_h_BTD is None:
        past_real_B, real_BS = cache.begin_chunk(real_BT, model.dtype)
    else:
        past_real_B, real_BS = cache.reopen_chunk(t)
    # transformers' positions: real tokens before this one (left padding excluded).
    position_ids_BT = past_real_B[:, None] + torch.arange(t, device=ids_BT.device)
    result = model.ponder_chunk(
        ids_BT, real_BT, position_ids_BT, cache, real_BS, None, tau, num_run, pass0_h_BTD
    )
    cache.end_chunk(result.active, real_BT)
    return result

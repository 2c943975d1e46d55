"""AdaPonderLM: a GPT-NeoX (Pythia) backbone run up to K times per token, with learned halting.

References:
  1) PonderLM, arXiv 2505.20674: re-run the whole stack on inputs refined by the probability-weighted
     mixture of the input embedding table.
  2) AdaPonderLM, arXiv 2603.01914: per-update MLP gates, monotonic hard halting, KV alignment.
  3) docs/method.md: the method as built here, with the choices the papers leave open.

`_ponder` is the dense formulation: every token runs in every pass and masks select what a halted
token would have kept (the reference). model/sparse.py computes the same function, forward and
backward, running only the tokens still active in each pass (eval mode by default, training with
`dense=False`); model/inference.py holds the KV cache of generation.

Shape legend:
  B batch, T query positions, S key positions, D hidden size, N heads, H head size,
  R rotary dims, V vocabulary, I MLP width, G gate width, K passes, L layers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from model.config import AdaPonderConfig
from model.decode import DecodeResult, applies_to, compiled_pass, decode_step
from model.hf_compat import config_from_checkpoint, load_checkpoint_state_dict, match_state_dict
from model.inference import checked_cache, chunk_real
from model.sparse import AlignedKV, PassLayout, packed_attention, ponder_packed, run_pass
from model.speculative import assisted_decoding

KV = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Backbone: GPT-NeoX exactly as Pythia, with Hugging Face parameter names.


def rotary_cos_sin(
    position_ids_BT: torch.Tensor, rotary_ndims: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, R] for GPT-NeoX rotary embeddings, computed in fp32."""
    exponent = torch.arange(0, rotary_ndims, 2, device=position_ids_BT.device, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (exponent / rotary_ndims))
    freqs_BTR = position_ids_BT[..., None].float() * inv_freq
    emb_BTR = torch.cat((freqs_BTR, freqs_BTR), dim=-1)
    return emb_BTR.cos()[:, None].to(dtype), emb_BTR.sin()[:, None].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BNTH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (GPT-NeoX `rotate_half` style); the rest pass through."""
    r = cos.shape[-1]
    x_rot, x_pass = x_BNTH[..., :r], x_BNTH[..., r:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with GPT-NeoX's fused, per-head interleaved q|k|v projection."""

    def __init__(self, config: AdaPonderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense.is_residual_output = True

    def project(
        self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, N, T, H], rotary applied to q and k."""
        b, t, _ = x_BTD.shape
        qkv_BNTX = self.query_key_value(x_BTD).view(b, t, self.num_heads, 3 * self.head_size).transpose(1, 2)
        q, k, v = qkv_BNTX.chunk(3, dim=-1)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(
        self, q_BNTH: torch.Tensor, k_BNSH: torch.Tensor, v_BNSH: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention output after `dense`, [B, T, D]. `mask` [B, 1, T, S] bool (True: attend) or
        None for plain causal attention over T == S positions."""
        out_BNTH = F.scaled_dot_product_attention(
            q_BNTH, k_BNSH, v_BNSH, attn_mask=mask, is_causal=mask is None
        )
        b, _, t, _ = out_BNTH.shape
        return self.dense(out_BNTH.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: AdaPonderConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dense_4h_to_h.is_residual_output = True
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x_BTD)))


class Layer(GradientCheckpointingLayer):
    """One GPT-NeoX block with KV alignment for halted tokens.

    Tensors are positional so that activation checkpointing passes gradients through them.
    """

    def __init__(self, config: AdaPonderConfig) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        k_prev_BNTH: torch.Tensor | None = None,
        v_prev_BNTH: torch.Tensor | None = None,
        active_BT: torch.Tensor | None = None,
        layout: PassLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the block output and this pass's aligned keys and values.

        With `layout` (model.sparse) `x` holds the pass's active tokens only, [n, D]; the rotary
        tables and the mask are the layout's, and k_prev / v_prev the K/V store they update."""
        if layout is not None:
            attn_BTD, k, v = packed_attention(
                self.attention, self.input_layernorm(x_BTD), k_prev_BNTH, v_prev_BNTH, layout
            )
        else:
            q, k, v = self.attention.project(self.input_layernorm(x_BTD), cos, sin)
            if active_BT is not None:
                # KV alignment: K = where(m^i, K_new, K_prev). K_prev is the previous pass's aligned
                # cache, so a token halted several passes ago keeps its last active pass's K/V.
                keep_B1T1 = active_BT[:, None, :, None]
                k = torch.where(keep_B1T1, k, k_prev_BNTH)
                v = torch.where(keep_B1T1, v, v_prev_BNTH)
            attn_BTD = self.attention.attend(q, k, v, mask)
        if self.use_parallel_residual:
            out_BTD = x_BTD + attn_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        else:
            y_BTD = x_BTD + attn_BTD
            out_BTD = y_BTD + self.mlp(self.post_attention_layernorm(y_BTD))
        return out_BTD, k, v


# Bytes of one chunk's fp32 [tokens, V] logits in the pondering mixture: 166 tokens at Pythia's vocabulary.
MIXTURE_CHUNK_BYTES = 2**25


class _ChunkedMixture(torch.autograd.Function):
    """e = softmax(h W_out^T) @ W_in [n, D] over chunks of tokens, softmax in fp32, never holding
    more than one chunk's [c, V] logits and probabilities, in the forward or the backward.

    Backward recomputes each chunk's probabilities P from h and applies, per chunk:
    dP = dE W_in^T, dlogits = P * (dP - sum(P * dP)), dh = dlogits W_out, dW_out += dlogits^T h,
    dW_in += P^T dE. Top-k (k > 0): softmax over the k largest logits only; the gradients then
    touch only those k rows of each table (index_add), as the embedding_bag it replaces did.
    """

    @staticmethod
    def forward(ctx, h_nD, w_out_VD, w_in_VD, topk: int) -> torch.Tensor:
        ctx.save_for_backward(h_nD, w_out_VD, w_in_VD)
        ctx.topk = topk
        e_nD = h_nD.new_empty(h_nD.shape[0], w_in_VD.shape[1], dtype=w_in_VD.dtype)
        for rows in _chunks(h_nD.shape[0], w_out_VD.shape[0]):
            e_nD[rows] = _mixture_chunk(h_nD[rows], w_out_VD, w_in_VD, topk)
        return e_nD

    @staticmethod
    def backward(ctx, de_nD):
        h_nD, w_out_VD, w_in_VD = ctx.saved_tensors
        need_h, need_out, need_in = ctx.needs_input_grad[:3]
        dh_nD = torch.zeros_like(h_nD) if need_h else None
        # fp32 accumulators across chunks, cast to the parameters' dtype at the end.
        dw_out = torch.zeros_like(w_out_VD, dtype=torch.float32) if need_out else None
        dw_in = torch.zeros_like(w_in_VD, dtype=torch.float32) if need_in else None
        for rows in _chunks(h_nD.shape[0], w_out_VD.shape[0]):
            h_cD, de_cD = h_nD[rows], de_nD[rows].to(w_in_VD.dtype)
            logits_cV = (h_cD @ w_out_VD.T).float()
            if ctx.topk:
                dh_cD = _topk_backward(logits_cV, h_cD, de_cD, w_out_VD, w_in_VD, ctx.topk, dw_out, dw_in)
                if need_h:
                    dh_nD[rows] = dh_cD
                continue
            p_cV = logits_cV.softmax(-1)
            if need_in:  # addmm_: no [V, D] temporary per chunk
                dw_in.addmm_(p_cV.T, de_cD.float())
            dp_cV = (de_cD @ w_in_VD.T).float()
            # In place, with the row sums as a batched dot product: two [c, V] buffers in all.
            dp_cV -= torch.bmm(p_cV[:, None, :], dp_cV[:, :, None])[:, 0]
            dlogits_cV = dp_cV.mul_(p_cV).to(h_nD.dtype)
            if need_h:
                dh_nD[rows] = dlogits_cV @ w_out_VD
            if need_out:
                dw_out.addmm_(dlogits_cV.T.float(), h_cD.float())
        return (
            dh_nD,
            dw_out.to(w_out_VD.dtype) if need_out else None,
            dw_in.to(w_in_VD.dtype) if need_in else None,
            None,
        )


def _chunks(n: int, vocab_size: int) -> list[slice]:
    size = max(1, MIXTURE_CHUNK_BYTES // (4 * vocab_size))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _mixture_chunk(
    h_cD: torch.Tensor, w_out_VD: torch.Tensor, w_in_VD: torch.Tensor, topk: int
) -> torch.Tensor:
    logits_cV = (h_cD @ w_out_VD.T).float()
    if topk:
        # Renormalised over the k most probable tokens (PonderLM's top-k variant).
        vals_ck, idx_ck = logits_cV.topk(topk, dim=-1)
        return F.embedding_bag(
            idx_ck, w_in_VD, per_sample_weights=vals_ck.softmax(-1).to(w_in_VD.dtype), mode="sum"
        )
    return logits_cV.softmax(-1).to(w_in_VD.dtype) @ w_in_VD


def _topk_backward(
    logits_cV: torch.Tensor,
    h_cD: torch.Tensor,
    de_cD: torch.Tensor,
    w_out_VD: torch.Tensor,
    w_in_VD: torch.Tensor,
    topk: int,
    dw_out: torch.Tensor | None,
    dw_in: torch.Tensor | None,
) -> torch.Tensor:
    """dh [c, D] of one top-k chunk; accumulates into dw_out / dw_in (fp32) where given."""
    vals_ck, idx_ck = logits_cV.topk(topk, dim=-1)
    w_ck = vals_ck.softmax(-1)
    flat_idx = idx_ck.reshape(-1)
    dw_ck = (w_in_VD[idx_ck] * de_cD[:, None]).sum(-1).float()
    if dw_in is not None:
        dw_in.index_add_(0, flat_idx, (w_ck[..., None] * de_cD.float()[:, None]).reshape(-1, de_cD.shape[1]))
    dvals_ck = w_ck * (dw_ck - (w_ck * dw_ck).sum(-1, keepdim=True))
    if dw_out is not None:
        dw_out.index_add_(
            0, flat_idx, (dvals_ck[..., None] * h_cD.float()[:, None]).reshape(-1, h_cD.shape[1])
        )
    return (dvals_ck.to(h_cD.dtype)[..., None] * w_out_VD[idx_ck]).sum(1)


class PonderHead(nn.Linear):
    """`embed_out`: the LM head, and the first half of the pondering mixture.

    Called by `embed_in` with its table, so that ZeRO-3 has gathered both weights (each module's are
    gathered for its own forward and, through the hooks on its output, for its backward).
    """

    def forward(self, h: torch.Tensor, table: torch.Tensor | None = None, topk: int = 0) -> torch.Tensor:
        """h [..., D] -> logits [..., V]; with `table` [V, D]: softmax(logits) @ table [..., D]."""
        if table is None:
            return super().forward(h)
        e_nD = _ChunkedMixture.apply(h.reshape(-1, h.shape[-1]), self.weight, table, topk)
        return e_nD.view(*h.shape[:-1], table.shape[1])


class PonderEmbedding(nn.Embedding):
    """`embed_in`: token lookup for ids, and the pondering mixture `P @ W` for hidden states.

    The mixture runs through this module's forward, not through `.weight` from outside, so that
    ZeRO-3 gathers the partitioned table for it like for any other call.
    """

    def forward(self, x: torch.Tensor, head: PonderHead | None = None, topk: int = 0) -> torch.Tensor:
        """ids [...] -> rows; hidden states h [..., D] with the LM `head` -> the mixture
        softmax(head(h)) @ W (over the `topk` most probable tokens if > 0), never a [..., V] tensor
        for more than one chunk of tokens."""
        if head is not None:
            return head(x, self.weight, topk)
        return super().forward(x)


class Backbone(nn.Module):
    """`gpt_neox`: embedding table, layers and final norm; one call of `run_pass` is one pass."""

    def __init__(self, config: AdaPonderConfig) -> None:
        super().__init__()
        self.embed_in = PonderEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def run_pass(
        self,
        e_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_prev: list[KV] | None,
        active_BT: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Final-norm output h [B, T, D] of one pass and the aligned K/V of every layer."""
        x_BTD, kv = e_BTD, []
        for i, layer in enumerate(self.layers):
            k_prev, v_prev = kv_prev[i] if kv_prev is not None else (None, None)
            x_BTD, k, v = layer(x_BTD, cos, sin, mask, k_prev, v_prev, active_BT)
            kv.append((k, v))
        return self.final_layer_norm(x_BTD), kv


class PonderGate(nn.Module):
    """MLP_i = Linear(D, G) -> GELU -> Linear(G, 1): one halting gate per pondering update."""

    def __init__(self, config: AdaPonderConfig) -> None:
        super().__init__()
        self.dense_in = nn.Linear(config.hidden_size, config.gate_intermediate_size)
        self.act = ACT2FN["gelu"]
        self.dense_out = nn.Linear(config.gate_intermediate_size, 1)
        self.dense_out.is_gate_output = True

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """s = sigmoid(MLP(h)) [B, T] in fp32, so that s < tau is decided at full precision."""
        return torch.sigmoid(self.dense_out(self.act(self.dense_in(h_BTD))).float()).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Outputs, losses and compute accounting.


@dataclass
class AdaPonderOutput(ModelOutput):
    """What one forward returns; see docs/model-api.md for every field."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    ponder_loss: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    passes: torch.Tensor | None = None
    halted_fraction: torch.Tensor | None = None
    mean_passes: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    flops: dict[str, torch.Tensor] | None = None
    # model.inference.AdaPonderCache after a cached call; generate() reads it back under this name.
    cache: Any = None


def bottom_k_gate_loss(gates_UBT: torch.Tensor, real_BT: torch.Tensor, k: float) -> torch.Tensor:
    """Mean of the smallest fraction k of all gate values (all updates U, all real tokens).

    Entries of tokens that halted before an update are 0 (and carry no gradient): they fill the
    bottom first, so once a fraction k of (token, update) pairs sits below tau the loss vanishes.
    """
    values = gates_UBT[real_BT.expand_as(gates_UBT)]
    count = int(k * values.numel())
    if count == 0:
        return gates_UBT.sum() * 0.0
    return torch.topk(values, count, largest=False, sorted=False).values.mean()


def forward_flops(
    config: AdaPonderConfig,
    active_KBT: torch.Tensor,
    real_BT: torch.Tensor,
    past_real_B: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Forward FLOPs of this batch as run adaptively (halted tokens computed nowhere), by part.

    Matmul FLOPs only (2 per multiply-add). A token active in pass i pays one backbone pass plus
    attention over its causal context of real keys; a gate is evaluated after every pass but the
    last; head + mixture (4 D V) are paid only by tokens that go on to the next pass; the final
    head (2 D V) once per token. `dense_total` is the same batch with every token in every pass.
    `past_real_B` counts real tokens already in a KV cache: they lengthen every query's context.
    """
    d, v, g = config.hidden_size, config.vocab_size, config.gate_intermediate_size
    num_layers, k_passes = config.num_hidden_layers, active_KBT.shape[0]
    active = (active_KBT & real_BT).double()
    context_BT = real_BT.double().cumsum(-1)
    if past_real_B is not None:
        context_BT = context_BT + past_real_B.double()[:, None]
    per_backbone = 2 * num_layers * (4 * d * d + 2 * d * config.intermediate_size)
    per_gate = 2 * (d * g + g) if config.adaptive else 0
    parts = {
        "backbone": active.sum() * per_backbone,
        "attention": (active * context_BT).sum() * 4 * num_layers * d,
        "head": real_BT.double().sum() * 2 * d * v,
        "mixture": active[1:].sum() * 4 * d * v,
        "gates": active[:-1].sum() * per_gate,
    }
    parts["total"] = sum(parts.values())
    n_real = real_BT.double().sum()
    parts["dense_total"] = (
        n_real * k_passes * per_backbone
        + k_passes * (real_BT.double() * context_BT).sum() * 4 * num_layers * d
        + n_real * 2 * d * v
        + (k_passes - 1) * n_real * (4 * d * v + per_gate)
    )
    return parts


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
    last_pass_KBT = F.one_hot(passes_BT - 1, active_KBT.shape[0]).permute(2, 0, 1).bool()
    halted_K = (last_pass_KBT & real_BT).sum((1, 2)).double() / n_real
    mean = (passes_BT * real_BT).sum().double() / n_real
    return passes_BT, halted_K, mean


def _padding_mask(attention_mask_BT: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, T, T] bool: causal, keys restricted to real tokens; None when nothing is padded.

    Every query may see itself, so a padding query at the left edge has a finite (unused) row.
    """
    if attention_mask_BT is None or bool(attention_mask_BT.all()):
        return None
    t = attention_mask_BT.shape[-1]
    causal_TT = torch.ones(t, t, dtype=torch.bool, device=attention_mask_BT.device).tril()
    eye_TT = torch.eye(t, dtype=torch.bool, device=attention_mask_BT.device)
    return causal_TT & (attention_mask_BT.bool()[:, None, None, :] | eye_TT)


# --------------------------------------------------------------------------------------------------
# The model.


class AdaPonderPreTrainedModel(PreTrainedModel):
    config_class = AdaPonderConfig
    config: AdaPonderConfig
    base_model_prefix = "gpt_neox"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Layer"]
    _keys_to_ignore_on_load_unexpected = [r"attention\.bias", r"attention\.masked_bias", r"inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Zero biases, unit norms, a positive gate output bias, and normal weights of std `small` =
        sqrt(2 / 5d), except the residual output projections (attention.dense, mlp.dense_4h_to_h),
        scaled for the depth L' = L x K unrolled over the passes:

            pythia    N(0, 2 / (L' sqrt d))                    GPT-NeoX's small_init / wang_init
            ponderlm  N(0, small / sqrt(2 L')), cut at 3 std   PonderLM's released code

        so ponderlm's output projections are sqrt(L' / 20) x pythia's (2.19x at 410M with K = 4)."""
        cfg = self.config
        small = (2.0 / (5.0 * cfg.hidden_size)) ** 0.5
        depth = cfg.num_hidden_layers * cfg.num_passes
        truncated = cfg.init_scheme == "ponderlm"

        def draw(weight: torch.Tensor, std: float) -> None:
            if truncated:
                init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            else:
                init.normal_(weight, mean=0.0, std=std)

        if truncated:
            residual = small / (2 * depth) ** 0.5
        else:
            residual = 2.0 / (depth * cfg.hidden_size**0.5)
        if isinstance(module, nn.Linear):
            draw(module.weight, residual if getattr(module, "is_residual_output", False) else small)
            if module.bias is not None:
                if getattr(module, "is_gate_output", False):
                    init.constant_(module.bias, cfg.gate_bias_init)
                else:
                    init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            draw(module.weight, small)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class AdaPonderForCausalLM(AdaPonderPreTrainedModel, GenerationMixin):
    """GPT-NeoX with K-pass pondering and token-wise gated halting (docs/method.md)."""

    def __init__(self, config: AdaPonderConfig) -> None:
        super().__init__(config)
        self.gpt_neox = Backbone(config)
        self.embed_out = PonderHead(config.hidden_size, config.vocab_size, bias=False)
        num_gates = config.num_passes - 1 if config.adaptive else 0
        self.ponder_gates = nn.ModuleList([PonderGate(config) for _ in range(num_gates)])
        # The decode step's pass function (model/decode.py); None: model.sparse.run_pass, eager.
        self.decode_pass = None
        self.post_init()

    def compile_decode(self, **compile_kwargs: Any) -> None:
        """Run the decode step's layers through `torch.compile` (model.decode.compiled_pass); opt-in:
        the first steps compile (tens of seconds on CPU), and the outputs then agree with the eager
        step to float rounding only. BENCHMARKS.md measures what it gains."""
        self.decode_pass = compiled_pass(**compile_kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gpt_neox.embed_in

    def get_output_embeddings(self) -> nn.Linear:
        return self.embed_out

    def gate_parameters(self):
        return self.ponder_gates.parameters()

    def backbone_parameters(self):
        return (p for n, p in self.named_parameters() if not n.startswith("ponder_gates."))

    def initialize_weights_with(self, gather) -> None:
        """Pythia init for a model whose parameters are partitioned (ZeRO-3 `zero.Init`).

        `gather(params)` is a context manager that materialises `params` and publishes one rank's
        values on exit (`deepspeed.zero.GatheredParameters(params, modifier_rank=0)`); the model
        itself stays free of distributed code.
        """
        for module in self.modules():
            params = list(module.parameters(recurse=False))
            if params:
                with gather(params):
                    self._init_weights(module)

    def ponder_embedding(self, h: torch.Tensor) -> torch.Tensor:
        """e^i = softmax(embed_out(h^i)) @ (embed_in.weight * embed_scale) [..., D], softmax in fp32.

        Chunked over tokens, forward and backward (`_ChunkedMixture`): no [..., V] logits or
        probabilities exist beyond one chunk's, with or without activation checkpointing.
        """
        mixture = self.gpt_neox.embed_in(h, self.embed_out, self.config.ponder_topk)
        return mixture * self.config.embed_scale

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not input_ids.numel():
            return
        low, high = (int(x) for x in input_ids.aminmax())  # one host sync per forward
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.config.vocab_size}); "
                f"got values in [{low}, {high}]"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        shift_labels: bool = True,
        ponder_lambda: float = 0.0,
        ponder_k: float = 0.0,
        dense: bool | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        exit_passes: torch.Tensor | None = None,
        halt_threshold: float | None = None,
        max_passes: int | None = None,
        fast_decode: bool = True,
        output_halting: bool = True,
        **kwargs: Any,
    ) -> AdaPonderOutput:
        """K-pass pondering forward, dense (`dense=True`, the default in training mode) or sparse,
        skipping halted tokens (model/sparse.py; `dense=False`, the default in eval mode), with the
        same numbers and gradients. `halt_threshold` (tau) and `max_passes` override the config's
        for this call: the inference-time compute knob. See docs/model-api.md for arguments and
        outputs. A single-token cached call runs model/decode.py's step unless `fast_decode=False`;
        `output_halting=False` leaves passes, halted_fraction, mean_passes and flops unset (and the
        decode step's gates; generate() asks for none of them)."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        self._check_input_ids(input_ids)
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0")
        tau, num_run = self._compute_knob(halt_threshold, max_passes)
        cached = cache is not None or bool(use_cache)
        sparse = self._runs_sparse(dense, cached)
        if exit_passes is not None:
            self._check_exit_passes(exit_passes, input_ids)
        b, t = input_ids.shape
        past_real_B = None
        if cached:
            cache = checked_cache(cache, self.config)
            real_BT = chunk_real(attention_mask, b, t, cache.get_seq_length(), input_ids.device)
            if fast_decode and applies_to(self, cache, real_BT, labels, exit_passes):
                return self._decode_step(
                    input_ids, position_ids, cache, tau, num_run, use_cache, output_halting
                )
            position_ids = self._position_ids(position_ids, b, t, cache.get_seq_length(), input_ids.device)
            with torch.no_grad():  # the cache is written in place: inference only
                past_real_B, real_BS = cache.begin_chunk(real_BT, self.dtype)
                result = self._ponder_sparse(
                    input_ids, real_BT, position_ids, cache, real_BS, exit_passes, tau, num_run
                )
                cache.end_chunk(result.active, real_BT)
            h_out_BTD, active_KBT, gates_UBT = result.h_out, result.active, result.gates
        else:
            position_ids = self._position_ids(position_ids, b, t, 0, input_ids.device)
            real_BT = chunk_real(attention_mask, b, t, 0, input_ids.device)
            if sparse:
                kv = AlignedKV(self.config.num_hidden_layers)
                result = self._ponder_sparse(
                    input_ids, real_BT, position_ids, kv, real_BT, exit_passes, tau, num_run
                )
                h_out_BTD, active_KBT, gates_UBT = result.h_out, result.active, result.gates
            else:
                mask = _padding_mask(attention_mask)
                h_out_BTD, active_KBT, gates_UBT = self._ponder(
                    input_ids, position_ids, mask, exit_passes, tau, num_run
                )
        # generate() asks for the last position only (logits_to_keep=1): no head for the others.
        logits_BTV = self.embed_out(h_out_BTD[:, -logits_to_keep:] if logits_to_keep else h_out_BTD)
        returns_cache = cached and use_cache is not False
        out = AdaPonderOutput(logits=logits_BTV, gates=gates_UBT, cache=cache if returns_cache else None)
        if labels is not None:
            self._add_losses(out, labels, shift_labels, real_BT, ponder_lambda, ponder_k)
        if output_halting:
            with torch.no_grad():
                out.passes, out.halted_fraction, out.mean_passes = halting_stats(active_KBT, real_BT)
                out.flops = forward_flops(self.config, active_KBT, real_BT, past_real_B)
        return out

    def _decode_step(
        self,
        input_ids_B1: torch.Tensor,
        position_ids: torch.Tensor | None,
        cache: Any,
        tau: float,
        num_run: int,
        use_cache: bool | None,
        output_halting: bool,
    ) -> AdaPonderOutput:
        """One new token per sequence through model/decode.py's fixed-shape step."""
        cfg, b, device = self.config, input_ids_B1.shape[0], input_ids_B1.device
        past_real_B = cache.real.sum(-1) if output_halting else None
        step = self.decode(input_ids_B1, position_ids, cache, tau, num_run, output_halting)
        out = AdaPonderOutput(
            logits=self.embed_out(step.h_out), cache=cache if use_cache is not False else None
        )
        if output_halting:
            with torch.no_grad():
                passes_B1 = torch.as_tensor(step.passes, device=device).expand(b)[:, None]
                active_KB1 = active_from_passes(passes_B1, cfg.num_passes)
                real_B1 = torch.ones(b, 1, dtype=torch.bool, device=device)
                out.gates = torch.stack(step.gates)[..., None] if step.gates is not None else None
                out.passes, out.halted_fraction, out.mean_passes = halting_stats(active_KB1, real_B1)
                out.flops = forward_flops(cfg, active_KB1, real_B1, past_real_B)
        return out

    def decode(
        self,
        input_ids_B1: torch.Tensor,
        position_ids: torch.Tensor | None,
        cache: Any,
        tau: float,
        num_run: int,
        want_gates: bool = False,
    ) -> DecodeResult:
        """model/decode.py's step for one new real token per sequence (`applies_to` holds): the last
        run pass's output h [B, 1, D], the passes run and, if asked, the gates."""
        cfg, b, device = self.config, input_ids_B1.shape[0], input_ids_B1.device
        position_ids = self._position_ids(position_ids, b, 1, cache.get_seq_length(), device)
        cos, sin = rotary_cos_sin(position_ids, cfg.rotary_ndims, cfg.rotary_emb_base, self.dtype)
        pass_fn = self.decode_pass or run_pass
        return decode_step(self, input_ids_B1, cos, sin, cache, tau, num_run, want_gates, pass_fn)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs of each generate() step, without the per-call halting statistics
        (the cache records every position's passes) unless the caller asks for them."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs.setdefault("output_halting", False)
        return inputs

    @staticmethod
    def _position_ids(
        position_ids: torch.Tensor | None, b: int, t: int, past: int, device: torch.device
    ) -> torch.Tensor:
        """The call's position ids, by default the positions past .. past + T - 1."""
        if position_ids is None:
            return torch.arange(past, past + t, device=device).expand(b, t)
        if position_ids.shape != (b, t):
            raise ValueError(
                f"position_ids must be [{b}, {t}] like input_ids, got {list(position_ids.shape)}"
            )
        return position_ids

    def _ponder_sparse(
        self,
        input_ids_BT: torch.Tensor,
        real_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        kv: Any,
        real_BS: torch.Tensor,
        exit_passes_BT: torch.Tensor | None,
        tau: float,
        num_run: int,
        pass0_h_BTD: torch.Tensor | None = None,
    ):
        """model.sparse.ponder_packed on this call's tokens, after `real_BS.shape[1] - T` cached ones."""
        cfg = self.config
        cos, sin = rotary_cos_sin(position_ids_BT, cfg.rotary_ndims, cfg.rotary_emb_base, self.dtype)
        # ZeRO-3 (partitioned parameters) gathers each module's weights on every rank together, and
        # gradient reduction expects every parameter on every rank: then no pass may be skipped.
        uniform = torch.is_grad_enabled() or hasattr(self.embed_out.weight, "ds_id")
        past = real_BS.shape[1] - input_ids_BT.shape[1]
        return ponder_packed(
            self,
            input_ids_BT,
            real_BT,
            cos,
            sin,
            kv,
            past,
            real_BS,
            tau,
            num_run,
            exit_passes_BT,
            uniform,
            pass0_h_BTD,
        )

    def _compute_knob(self, halt_threshold: float | None, max_passes: int | None) -> tuple[float, int]:
        """tau and the passes to run at most, from the call's arguments or else the config."""
        k = self.config.num_passes
        tau = self.config.halt_threshold if halt_threshold is None else float(halt_threshold)
        cap = max_passes if max_passes is not None else self.config.max_passes
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"halt_threshold must be in [0, 1), got {tau}")
        if cap is not None and not 1 <= cap <= k:
            raise ValueError(f"max_passes must be in [1, num_passes={k}], got {cap}")
        return tau, k if cap is None else int(cap)

    def _runs_sparse(self, dense: bool | None, cached: bool) -> bool:
        """Dense with `dense=True` and by default in training mode (the trainer passes
        `ponder.sparse_training`); sparse with `dense=False`, with a KV cache, and by default in
        eval mode whenever tokens can halt (adaptive, K > 1)."""
        if cached and self.training:
            raise ValueError("a KV cache is for inference: call model.eval()")
        if dense and cached:
            raise ValueError("a KV cache needs the sparse path: leave dense unset")
        if dense is None:
            can_halt = self.config.adaptive and self.config.num_passes > 1
            dense = not cached and (self.training or not can_halt)
        return not dense

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        """generate()'s hook (transformers/generation/utils.py) that puts a cache in
        `model_kwargs["cache"]`: ours, sized once for the whole generation, instead of a DynamicCache."""
        if generation_config.cache_implementation is not None:
            raise ValueError("cache_implementation is not supported: AdaPonderLM uses its own per-pass cache")
        if model_kwargs.get("cache") is not None and generation_config.use_cache is False:
            raise ValueError("a cache was passed with use_cache=False")
        if generation_config.use_cache is not False:
            # The last generated token is never fed back: max_length - 1 positions are cached.
            max_length = max(generation_config.max_length - 1, 1)
            model_kwargs["cache"] = checked_cache(model_kwargs.get("cache"), self.config, max_length)

    def _assisted_decoding(
        self,
        input_ids: torch.Tensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        inputs_tensor: torch.Tensor | None = None,
        assistant_model: Any = None,
        assistant_tokenizer: Any = None,
        tokenizer: Any = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """generate()'s assisted decoding (transformers/generation/utils.py), reached with
        `assistant_early_exit=1, num_assistant_tokens=n`: self-speculative decoding, pass 1
        drafting n tokens and the remaining passes verifying them (model/speculative.py)."""
        if synced_gpus:
            raise ValueError("synced_gpus is not supported with assistant_early_exit")
        return assisted_decoding(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            streamer=streamer,
            assistant_model=assistant_model,
            **model_kwargs,
        )

    def _check_exit_passes(self, exit_passes: torch.Tensor, input_ids: torch.Tensor) -> None:
        if not self.config.adaptive:
            raise ValueError("exit_passes replaces the gates' halting: it needs an adaptive model")
        if exit_passes.shape != input_ids.shape:
            raise ValueError(
                f"exit_passes has shape {tuple(exit_passes.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        low, high = (int(x) for x in exit_passes.aminmax())
        if low < 1 or high > self.config.num_passes:
            raise ValueError(f"exit_passes must lie in [1, {self.config.num_passes}], got [{low}, {high}]")

    def _ponder(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        mask: torch.Tensor | None,
        exit_passes_BT: torch.Tensor | None,
        tau: float,
        num_run: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The pondering loop (docs/method.md), dense.

        `exit_passes_BT` (passes per token, 1..K) replaces the threshold decision 1[s^i >= tau] for
        fixed-pruning baselines; the gates still scale the updates. Only the first `num_run` passes
        run (the `max_passes` cap): every token still active then stops there.

        Returns the frozen outputs h_out [B, T, D], the activity mask m^i of every pass [K, B, T]
        and the gate values s^i of every update [K-1, B, T] (0 for already-halted tokens; None
        when not adaptive).
        """
        cfg = self.config
        cos, sin = rotary_cos_sin(position_ids_BT, cfg.rotary_ndims, cfg.rotary_emb_base, self.dtype)
        # E^0 = embed_in(x) * embed_scale * base_mult
        e_BTD = self.gpt_neox.embed_in(input_ids_BT) * (cfg.embed_scale * cfg.base_mult)
        active_BT = torch.ones_like(input_ids_BT, dtype=torch.bool)  # m^0 = 1
        actives, gates = [active_BT], []
        kv_prev, h_out_BTD = None, None
        for i in range(num_run):
            h_BTD, kv_prev = self.gpt_neox.run_pass(
                e_BTD, cos, sin, mask, kv_prev, active_BT if i > 0 and cfg.adaptive else None
            )
            # Halted tokens' outputs are frozen: h_out = where(m^i, h^i, h_out_prev).
            h_out_BTD = h_BTD if i == 0 else torch.where(active_BT[..., None], h_BTD, h_out_BTD)
            if i == num_run - 1:
                break
            e_ponder_BTD = self.ponder_embedding(h_BTD)  # e^i = P^i @ (W_in * scale)
            if cfg.adaptive:
                s_BT = self.ponder_gates[i](h_BTD)  # s^i = sigmoid(MLP_i(h^i))
                gates.append(torch.where(active_BT, s_BT, torch.zeros_like(s_BT)))
                # m^{i+1} = m^i * 1[s^i >= tau]: hard, monotonic, no gradient.
                keep_BT = s_BT.detach() >= tau if exit_passes_BT is None else exit_passes_BT > i + 1
                active_BT = active_BT & keep_BT
                # E^{i+1} = E^i + m^{i+1} * s^i * e^i
                step_BT1 = (active_BT * s_BT)[..., None].to(e_BTD.dtype)
                e_BTD = e_BTD + step_BT1 * e_ponder_BTD
            else:
                e_BTD = e_BTD + e_ponder_BTD  # PonderLM: E^{i+1} = E^i + e^i
            actives.append(active_BT)
        # Passes cut by the cap: nobody active, no gate evaluated.
        cut = cfg.num_passes - num_run
        actives += [torch.zeros_like(active_BT)] * cut
        gates += [torch.zeros_like(active_BT, dtype=torch.float32)] * (cut if cfg.adaptive else 0)
        gates_UBT = torch.stack(gates) if gates else None
        return h_out_BTD, torch.stack(actives), gates_UBT

    def _add_losses(
        self,
        out: AdaPonderOutput,
        labels_BT: torch.Tensor,
        shift_labels: bool,
        real_BT: torch.Tensor,
        ponder_lambda: float,
        ponder_k: float,
    ) -> None:
        """Cross-entropy (fp32) plus lambda * bottom-k gate loss, and per-position NLL."""
        logits_BTV = out.logits
        if shift_labels:
            labels_BT = F.pad(labels_BT[:, 1:], (0, 1), value=-100)
        # A padding position predicts nothing (the sparse path never computes it: logits 0).
        labels_BT = labels_BT.masked_fill(~real_BT, -100)
        # Over contiguous [B*T, V] rows: the [B, V, T] transposed form copies the logits twice and
        # runs log_softmax strided (2.3x the time of the loss at Pythia's vocabulary, on CPU).
        nll_BT = F.cross_entropy(
            logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=-100, reduction="none"
        ).view_as(labels_BT)
        out.loss_mask = labels_BT != -100
        out.token_nll = nll_BT.detach()
        out.lm_loss = nll_BT.sum() / out.loss_mask.sum().clamp(min=1)
        if out.gates is not None:
            out.ponder_loss = bottom_k_gate_loss(out.gates, real_BT, ponder_k)
        else:
            out.ponder_loss = torch.zeros((), device=logits_BTV.device)
        out.loss = out.lm_loss + ponder_lambda * out.ponder_loss

    @classmethod
    def from_pythia(cls, path: str, **overrides: Any) -> AdaPonderForCausalLM:
        """Load a Pythia, PonderLM ("PonderingPythia") or AdaPonderLM checkpoint directory in
        Hugging Face format; gate parameters missing from it are initialised, nothing else is."""
        model = cls(config_from_checkpoint(path, **overrides))
        state = match_state_dict(load_checkpoint_state_dict(path), model, source=path)
        model.load_state_dict(state, strict=False)
        model.init_source = str(path)
        return model

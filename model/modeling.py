"""AdaPonderLM: a GPT-NeoX (Pythia) backbone run up to K times per token, with learned halting.

References:
  1) PonderLM, arXiv 2505.20674: re-run the whole stack on inputs refined by the probability-weighted
     mixture of the input embedding table.
  2) AdaPonderLM, arXiv 2603.01914: per-update MLP gates, monotonic hard halting, KV alignment.

This file is the model: the backbone, the gates, the losses and the forward's dispatch. The pondering
loop and its execution strategies are model/ponder.py (K/V addressing: model/kv.py), the chunked
mixture model/mixture.py, FLOP/byte accounting model/accounting.py, transformers' generation hooks
model/generation.py, the KV cache of generation model/inference.py.

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
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from model.accounting import forward_flops, halting_stats
from model.config import AdaPonderConfig
from model.generation import PonderGenerationMixin
from model.hf_compat import config_from_checkpoint, load_checkpoint_state_dict, match_state_dict
from model.inference import checked_cache, chunk_real
from model.kv import AlignedKV, PassLayout, Rows, aligned_where, packed_attention
from model.mixture import ChunkedMixture
from model.ponder import (
    DecodeResult,
    checked_exits,
    decode_applies,
    decode_step,
    first_read,
    padding_mask,
    ponder_every_row,
    ponder_packed,
)

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

        With `layout` (model.kv) `x` holds the pass's active tokens only, [n, D]; the rotary
        tables and the mask are the layout's, and k_prev / v_prev the K/V store they update."""
        if layout is not None:
            attn_BTD, k, v = packed_attention(
                self.attention, self.input_layernorm(x_BTD), k_prev_BNTH, v_prev_BNTH, layout
            )
        else:
            q, k, v = self.attention.project(self.input_layernorm(x_BTD), cos, sin)
            if active_BT is not None:  # every row computed: K = where(m^i, K_new, K_prev)
                k, v = aligned_where(active_BT, k, v, k_prev_BNTH, v_prev_BNTH)
            attn_BTD = self.attention.attend(q, k, v, mask)
        if self.use_parallel_residual:
            out_BTD = x_BTD + attn_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        else:
            y_BTD = x_BTD + attn_BTD
            out_BTD = y_BTD + self.mlp(self.post_attention_layernorm(y_BTD))
        return out_BTD, k, v


class PonderHead(nn.Linear):
    """`embed_out`: the LM head, and the first half of the pondering mixture.

    Called by `embed_in` with its table, so that ZeRO-3 has gathered both weights (each module's are
    gathered for its own forward and, through the hooks on its output, for its backward).
    """

    def forward(self, h: torch.Tensor, table: torch.Tensor | None = None, topk: int = 0) -> torch.Tensor:
        """h [..., D] -> logits [..., V]; with `table` [V, D]: softmax(logits) @ table [..., D]."""
        if table is None:
            return super().forward(h)
        e_nD = ChunkedMixture.apply(h.reshape(-1, h.shape[-1]), self.weight, table, topk)
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


def bottom_k_gate_loss(
    gates_UBT: torch.Tensor, real_BT: torch.Tensor, k: float, n_real: int | None = None
) -> torch.Tensor:
    """Mean of the smallest fraction k of all gate values (all updates U, all real tokens).

    Entries of tokens that halted before an update are 0 (and carry no gradient): they fill the
    bottom first, so once a fraction k of (token, update) pairs sits below tau the loss vanishes.
    `n_real`: the number of real tokens, if known on the host (else read here).
    """
    n_real = int(real_BT.sum()) if n_real is None else n_real
    if n_real == real_BT.numel():
        values = gates_UBT.reshape(-1)
    else:  # padding entries sort last: the bottom k never reaches them
        values = gates_UBT.masked_fill(~real_BT, float("inf")).reshape(-1)
    count = int(k * gates_UBT.shape[0] * n_real)
    if count == 0:
        return gates_UBT.sum() * 0.0
    return torch.topk(values, count, largest=False, sorted=False).values.mean()


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


class AdaPonderForCausalLM(AdaPonderPreTrainedModel, PonderGenerationMixin):
    """GPT-NeoX with K-pass pondering and token-wise gated halting."""

    output_class = AdaPonderOutput  # what forward() returns, also from model.generation

    def __init__(self, config: AdaPonderConfig) -> None:
        super().__init__(config)
        self.gpt_neox = Backbone(config)
        self.embed_out = PonderHead(config.hidden_size, config.vocab_size, bias=False)
        num_gates = config.num_passes - 1 if config.adaptive else 0
        self.ponder_gates = nn.ModuleList([PonderGate(config) for _ in range(num_gates)])
        # Every rank calls every module of every pass, the same number of times, even with no active
        # token (ZeRO-3 gathers each module's partitioned weights on all ranks together, and gradient
        # reduction expects every parameter on every rank). training/engine.py turns it on.
        self.every_rank_calls_every_module = False
        self.post_init()

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

        Chunked over tokens, forward and backward (model.mixture.ChunkedMixture): no [..., V] logits or
        probabilities exist beyond one chunk's, with or without activation checkpointing.
        """
        mixture = self.gpt_neox.embed_in(h, self.embed_out, self.config.ponder_topk)
        return mixture * self.config.embed_scale

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
        exit_confidence: float | None = None,
        gate_scaling: bool = True,
        **kwargs: Any,
    ) -> AdaPonderOutput:
        """K-pass pondering forward, skipping halted tokens (the default; model/ponder.py), or every
        token in every pass (`dense=True`, the definition), with the same numbers and gradients.
        `halt_threshold` (tau) and `max_passes` override the config's for this call: the
        inference-time compute knob. See docs/model-api.md for arguments and outputs. A single-token
        cached call runs model.ponder.decode_step unless `fast_decode=False`; `output_halting=False`
        leaves passes, halted_fraction, mean_passes and flops unset (and the decode step's gates;
        generate() asks for none of them). `exit_confidence` and `gate_scaling=False` are the
        evaluation baselines' exits (model.ponder.ponder_loop), uncached calls only."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0")
        tau, num_run = self.compute_knob(halt_threshold, max_passes)
        cached = cache is not None or bool(use_cache)
        sparse = self._runs_sparse(dense, cached)
        exits = checked_exits(input_ids, exit_passes, exit_confidence, gate_scaling, cached)
        b, t = input_ids.shape
        past_real_B = None
        if cached:
            cache = checked_cache(cache, self.config)
            real_BT = chunk_real(attention_mask, b, t, cache.get_seq_length(), input_ids.device)
            rows = first_read(self, input_ids, real_BT, exit_passes)
            if fast_decode and decode_applies(self, cache, t, rows.n == b * t, labels, exit_passes):
                return self.decode_output(
                    input_ids, position_ids, cache, tau, num_run, use_cache, output_halting
                )
            position_ids = self._position_ids(position_ids, b, t, cache.get_seq_length(), input_ids.device)
            with torch.no_grad():  # the cache is written in place: inference only
                past_real_B, real_BS = cache.begin_chunk(real_BT, self.dtype)
                result = self.ponder_chunk(
                    input_ids, real_BT, position_ids, cache, real_BS, exit_passes, tau, num_run, rows=rows
                )
                cache.end_chunk(result.active, real_BT)
            h_out_BTD, active_KBT, gates_UBT = result.h_out, result.active, result.gates
        else:
            position_ids = self._position_ids(position_ids, b, t, 0, input_ids.device)
            real_BT = chunk_real(attention_mask, b, t, 0, input_ids.device)
            rows = first_read(self, input_ids, real_BT, exit_passes)
            if sparse:
                kv = AlignedKV(self.config.num_hidden_layers)
                args = (input_ids, real_BT, position_ids, kv, real_BT, exit_passes, tau, num_run)
                result = self.ponder_chunk(*args, rows=rows, **exits)
                h_out_BTD, active_KBT, gates_UBT = result.h_out, result.active, result.gates
            else:
                cfg = self.config
                cos, sin = rotary_cos_sin(position_ids, cfg.rotary_ndims, cfg.rotary_emb_base, self.dtype)
                h_out_BTD, active_KBT, gates_UBT = ponder_every_row(
                    self,
                    input_ids,
                    cos,
                    sin,
                    padding_mask(attention_mask, rows.n == b * t),
                    exit_passes,
                    tau,
                    num_run,
                    **exits,
                )
        # generate() asks for the last position only (logits_to_keep=1): no head for the others.
        logits_BTV = self.embed_out(h_out_BTD[:, -logits_to_keep:] if logits_to_keep else h_out_BTD)
        returns_cache = cached and use_cache is not False
        out = AdaPonderOutput(logits=logits_BTV, gates=gates_UBT, cache=cache if returns_cache else None)
        if labels is not None:
            self._add_losses(out, labels, shift_labels, real_BT, ponder_lambda, ponder_k, rows.n)
        if output_halting:
            with torch.no_grad():
                out.passes, out.halted_fraction, out.mean_passes = halting_stats(active_KBT, real_BT)
                out.flops = forward_flops(self.config, active_KBT, real_BT, past_real_B)
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
        """model.ponder.decode_step for one new real token per sequence (`decode_applies` holds): the last
        run pass's output h [B, 1, D], the passes run and, if asked, the gates."""
        cfg, b, device = self.config, input_ids_B1.shape[0], input_ids_B1.device
        position_ids = self._position_ids(position_ids, b, 1, cache.get_seq_length(), device)
        cos, sin = rotary_cos_sin(position_ids, cfg.rotary_ndims, cfg.rotary_emb_base, self.dtype)
        return decode_step(self, input_ids_B1, cos, sin, cache, tau, num_run, want_gates)

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

    def ponder_chunk(
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
        rows: Rows | None = None,
        **exits: Any,
    ):
        """The packed strategy (model.ponder.ponder_packed) on this call's tokens, after
        `real_BS.shape[1] - T` cached ones in the K/V store `kv`; `rows`: the real positions' sizes
        if read already (model.ponder.read_host)."""
        cfg = self.config
        cos, sin = rotary_cos_sin(position_ids_BT, cfg.rotary_ndims, cfg.rotary_emb_base, self.dtype)
        past = real_BS.shape[1] - input_ids_BT.shape[1]
        # With gradients every pass runs too (a [0, D] batch when nobody is left): every parameter
        # then gets a gradient, zero where no token used it, as in the every-row strategy.
        uniform = self.every_rank_calls_every_module or torch.is_grad_enabled()
        args = (input_ids_BT, real_BT, cos, sin, kv, past, real_BS, tau, num_run, exit_passes_BT)
        return ponder_packed(self, *args, uniform, pass0_h_BTD, rows, **exits)

    def compute_knob(self, halt_threshold: float | None, max_passes: int | None) -> tuple[float, int]:
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
        """The every-row definition only with `dense=True` (`ponder.sparse_training: false`); the
        packed strategy otherwise, in training and eval mode alike: it is never slower
        (BENCHMARKS.md, "Sparse vs dense training step")."""
        if cached and self.training:
            raise ValueError("a KV cache is for inference: call model.eval()")
        if dense and cached:
            raise ValueError("a KV cache needs the sparse path: leave dense unset")
        return not dense

    def _add_losses(
        self,
        out: AdaPonderOutput,
        labels_BT: torch.Tensor,
        shift_labels: bool,
        real_BT: torch.Tensor,
        ponder_lambda: float,
        ponder_k: float,
        n_real: int,
    ) -> None:
        """Cross-entropy (fp32) plus lambda * bottom-k gate loss, and per-position NLL; `n_real`
        real tokens."""
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
            out.ponder_loss = bottom_k_gate_loss(out.gates, real_BT, ponder_k, n_real)
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

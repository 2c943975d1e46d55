"""Adaptive inference: a per-pass KV cache, and a pondering forward that never computes halted tokens.

The dense formulation in modeling.py runs every token in every pass and uses `where` to make a halted
token look frozen (SPEC.md section 1, "KV reuse"). Here the same function is computed sparsely
(SPEC.md section 3): in pass i only the active tokens (m^i = 1) of the whole batch are gathered into
one packed [n, D] matrix, run through the layers, and scattered back; a halted token is never
computed again, and the cache holds its last active pass's K/V in every later pass, which is exactly
what the dense K = where(m^i, K_new, K_prev) simulates. Prefill and decode are the same code: a call
appends T new positions to the cache, and queries attend over all cached positions of their pass.

After pass i the gate runs for the active tokens, the head, softmax and mixture (e^i) only for those
that continue to pass i+1, and the final head only for the positions whose logits are asked for
(`logits_to_keep`). A pass with no active token is skipped (its cache entries are still carried
forward, because later tokens attend to them).

Plain PonderLM (`adaptive=False`: nobody halts) and K = 1 (Pythia) are the special cases where every
token is active in every pass; they take the same code path with no gather or scatter.

Shapes use the legend of modeling.py, plus: n active tokens of a pass (packed), R sequences with an
active token, C the widest such sequence (padded query grid), X = B*T flattened chunk positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import AdaPonderConfig
from model.modeling import AdaPonderForCausalLM, Layer, rotary_cos_sin

KVStore = tuple[torch.Tensor, torch.Tensor]  # one pass and layer's keys and values, [B, N, capacity, H]


class AdaPonderCache:
    """Keys and values of every pass and layer for the positions seen so far, plus halting state.

    Layout: one zero-initialised tensor `kv` [K, L, 2, B, N, capacity, H]; `keys(i, l)` is the
    [B, N, S, H] view that pass i's queries of layer l attend to. A position that halted after pass
    j holds copies of its pass-j keys/values in passes j+1 .. K-1, so every pass's attention reads
    one contiguous-per-head tensor, like a plain decoder's. Capacity grows by doubling, or is
    allocated once from `max_length` (generate() passes its maximum length).

    Memory per cached token: K * L * 2 * D elements of the model dtype plus 2 bytes (padding flag,
    passes run). pythia-70m with K = 4: 4 * 6 * 2 * 512 * 4 B = 192 KiB in fp32 (96 KiB in bf16),
    i.e. K times a vanilla Pythia KV cache.

    Cheaper layout (not implemented). Keeping only a token's last active K/V is not enough: a later
    token's pass-i query must see the pass-i K/V of every token still active in pass i, so a token
    needs its entries of every pass it ran. The exact minimum is those entries plus its exit pass:
    mean_passes / K of this size, without the copies. Pass i's attention then reads each position's
    entry of pass min(i, exit), a gather over the whole context per layer, pass and decode step (or
    attention over the union of the per-pass stores, masked to one entry per position). At the
    paper's rates (3.7-3.8 of 4 passes) that saves 5-8 % of the memory for an extra pass over the
    context on every step, so the copying layout is the one offered.
    """

    # Read by transformers' generate(): no static shapes, no compilation, no rollback.
    is_compileable = False
    is_croppable = False

    def __init__(self, config: AdaPonderConfig, max_length: int | None = None, scratch: bool = False) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.num_passes = config.num_passes
        # A scratch cache serves one forward that returns no cache: pass i only reads pass i and
        # writes pass i's entries over pass i - 1's, so two slots (i % 2) hold what is needed,
        # 2 / K of the memory. Its contents cannot be read back or extended.
        self.scratch = scratch
        self.num_slots = min(2, config.num_passes) if scratch else config.num_passes
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.max_length = max_length
        self.kv: torch.Tensor | None = None  # [K, L, 2, B, N, capacity, H]
        self._layer_kv: list[list[KVStore]] = []  # views of kv per pass and layer, made once
        self._real_BC: torch.Tensor | None = None  # bool: position is a real token (not padding)
        self._passes_BC: torch.Tensor | None = None  # uint8: passes run (0 for padding)
        self.seq_length = 0

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether it is a recurrent-state layer (generate() asks); none here is."""
        return [False] * self.num_layers

    @property
    def batch_size(self) -> int:
        return 0 if self.kv is None else self.kv.shape[3]

    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[5]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions (padding included), as transformers' `Cache` reports it."""
        return self.seq_length

    def keys(self, pass_idx: int, layer_idx: int) -> torch.Tensor:
        """Aligned keys [B, N, S, H] that pass `pass_idx` of layer `layer_idx` attends to."""
        return self._readable()[pass_idx, layer_idx, 0, :, :, : self.seq_length]

    def values(self, pass_idx: int, layer_idx: int) -> torch.Tensor:
        """Aligned values [B, N, S, H], as `keys`."""
        return self._readable()[pass_idx, layer_idx, 1, :, :, : self.seq_length]

    def _readable(self) -> torch.Tensor:
        if self.scratch:
            raise ValueError("a scratch cache keeps two passes only; its entries cannot be read back")
        return self._stored()

    @property
    def real(self) -> torch.Tensor:
        """[B, S] bool, True for real tokens, False for padding."""
        self._stored()
        return self._real_BC[:, : self.seq_length]

    @property
    def passes(self) -> torch.Tensor:
        """[B, S] long, passes each cached position ran (0 for padding)."""
        self._stored()
        return self._passes_BC[:, : self.seq_length].long()

    def memory_bytes(self) -> int:
        """Bytes held (allocated capacity, not only the used part)."""
        if self.kv is None:
            return 0
        flags = self._real_BC.numel() * 2  # bool + uint8 per position
        return self.kv.numel() * self.kv.element_size() + flags

    def layer_kv(self, pass_idx: int) -> list[KVStore]:
        """(keys, values) [B, N, capacity, H] of every layer of one pass, beyond the used length too."""
        return self._layer_kv[pass_idx % self.num_slots]

    def _stored(self) -> torch.Tensor:
        if self.kv is None:
            raise ValueError("the cache is empty: no forward has written to it yet")
        return self.kv

    def reserve(self, batch_size: int, length: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make room for `length` positions of `batch_size` sequences, keeping what is cached."""
        if self.scratch and self.kv is not None:
            raise ValueError("a scratch cache serves a single forward")
        if self.kv is not None and batch_size != self.batch_size:
            raise ValueError(f"the cache holds a batch of {self.batch_size} sequences, got {batch_size}")
        if self.kv is not None and (dtype != self.kv.dtype or device != self.kv.device):
            raise ValueError(f"the cache holds {self.kv.dtype} on {self.kv.device}, got {dtype} on {device}")
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity, self.max_length or 0)
        shape = (self.num_slots, self.num_layers, 2, batch_size, self.num_heads, capacity, self.head_size)
        # Zeros, not empty: padding positions are never computed, and a masked key whose value row
        # held NaN garbage would still poison the attention output (0 * NaN).
        kv = torch.zeros(shape, dtype=dtype, device=device)
        real_BC = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        passes_BC = torch.zeros(batch_size, capacity, dtype=torch.uint8, device=device)
        if self.kv is not None:
            s = self.seq_length
            kv[..., :s, :] = self.kv[..., :s, :]
            real_BC[:, :s] = self._real_BC[:, :s]
            passes_BC[:, :s] = self._passes_BC[:, :s]
        self._set(kv, real_BC, passes_BC)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep sequences `beam_idx` [B'] in that order (generate()'s beam search calls this)."""
        kv = self._stored()
        self._set(kv.index_select(3, beam_idx), self._real_BC[beam_idx], self._passes_BC[beam_idx])

    def _set(self, kv: torch.Tensor, real_BC: torch.Tensor, passes_BC: torch.Tensor) -> None:
        self.kv, self._real_BC, self._passes_BC = kv, real_BC, passes_BC
        self._layer_kv = [
            [(kv[i, j, 0], kv[i, j, 1]) for j in range(self.num_layers)] for i in range(self.num_slots)
        ]

    def carry_forward(self, pass_idx: int, start: int, end: int) -> None:
        """Copy positions [start, end) of pass `pass_idx - 1` into pass `pass_idx`, all layers: a
        token that halts before this pass keeps its last active K/V (active tokens overwrite)."""
        kv, slots = self._stored(), self.num_slots
        kv[pass_idx % slots, ..., start:end, :] = kv[(pass_idx - 1) % slots, ..., start:end, :]


def checked_cache(
    cache: object, config: AdaPonderConfig, max_length: int | None = None, scratch: bool = False
) -> AdaPonderCache:
    """`cache` if it is an AdaPonderCache, a new one if it is None; a ValueError otherwise."""
    if cache is None:
        return AdaPonderCache(config, max_length, scratch)
    if not isinstance(cache, AdaPonderCache):
        raise ValueError(f"cache must be a model.inference.AdaPonderCache, got {type(cache).__name__}")
    shape = (config.num_passes, config.num_hidden_layers, config.num_attention_heads, config.head_size)
    if (cache.num_passes, cache.num_layers, cache.num_heads, cache.head_size) != shape:
        raise ValueError(
            f"the cache was made for (passes, layers, heads, head size) = "
            f"{(cache.num_passes, cache.num_layers, cache.num_heads, cache.head_size)}, the model has {shape}"
        )
    return cache


# --------------------------------------------------------------------------------------------------
# Sparse execution of one pass.


@dataclass
class _PassLayout:
    """Where the active tokens of one pass sit in the cache and in the attention batch.

    Full grid (every chunk position is real and active, e.g. decode or an unpadded prefill before
    anyone halts): the tokens are the chunk itself, [B, T], and need no gather or scatter.
    Otherwise the n active tokens are packed, [n, D], for everything but attention, which runs on a
    padded query grid [R, C]: row r is the r-th sequence with an active token, whose active tokens
    fill its first columns in position order.
    """

    batch_size: int
    chunk_len: int
    past: int  # cached positions before this chunk
    cos: torch.Tensor  # rotary tables of the queries: [B, 1, T, R] (full grid) or [1, 1, n, R]
    sin: torch.Tensor
    batch_n: torch.Tensor | None = None  # [n] sequence of each packed token
    pos_n: torch.Tensor | None = None  # [n] its cache position
    rows_R: torch.Tensor | None = None  # sequences with an active token; None: all B
    slot_n: torch.Tensor | None = None  # [n] flat index into the [R, C] grid
    width: int = 0  # C
    mask: torch.Tensor | None = None  # [R, 1, C, S] bool, True: attend; None: see is_causal
    is_causal: bool = False

    @property
    def full(self) -> bool:
        return self.slot_n is None

    @property
    def end(self) -> int:
        return self.past + self.chunk_len


def _visible(q_pos_RC: torch.Tensor, real_RS: torch.Tensor) -> torch.Tensor:
    """[R, 1, C, S] bool: a query sees real keys at or before its position."""
    key_pos_S = torch.arange(real_RS.shape[-1], device=real_RS.device)
    return ((key_pos_S <= q_pos_RC[..., None]) & real_RS[:, None, :])[:, None]


def _full_layout(
    b: int,
    t: int,
    past: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    real_BS: torch.Tensor,
    keys_all_real: bool,
) -> _PassLayout:
    if keys_all_real and (t == 1 or past == 0):
        # One query per sequence sees every key; a fresh chunk is plainly causal.
        return _PassLayout(b, t, past, cos, sin, is_causal=t > 1)
    q_pos_BT = (past + torch.arange(t, device=real_BS.device)).expand(b, t)
    return _PassLayout(b, t, past, cos, sin, mask=_visible(q_pos_BT, real_BS))


def _packed_layout(
    flat_n: torch.Tensor,
    b: int,
    t: int,
    past: int,
    cos_XR: torch.Tensor,
    sin_XR: torch.Tensor,
    real_BS: torch.Tensor,
) -> _PassLayout:
    """Layout of the active chunk positions `flat_n` (sorted indices into B*T)."""
    n, device = flat_n.numel(), flat_n.device
    batch_n, pos_n = flat_n // t, past + flat_n % t
    rows_R, counts_R = torch.unique_consecutive(batch_n, return_counts=True)
    num_rows, width = rows_R.numel(), int(counts_R.max())
    row_n = torch.repeat_interleave(torch.arange(num_rows, device=device), counts_R)
    first_R = counts_R.cumsum(0) - counts_R
    slot_n = row_n * width + torch.arange(n, device=device) - first_R[row_n]
    # Unused grid slots query the last position: a finite row (the sequence has a real key), discarded.
    q_pos_X = torch.full((num_rows * width,), past + t - 1, dtype=torch.long, device=device)
    q_pos_X[slot_n] = pos_n
    all_rows = num_rows == b
    mask = _visible(q_pos_X.view(num_rows, width), real_BS if all_rows else real_BS[rows_R])
    cos_n, sin_n = cos_XR[flat_n][None, None], sin_XR[flat_n][None, None]  # [1, 1, n, R]
    rows = None if all_rows else rows_R
    return _PassLayout(b, t, past, cos_n, sin_n, batch_n, pos_n, rows, slot_n, width, mask)


def _attention(layer: Layer, x_nD: torch.Tensor, kv: KVStore, lay: _PassLayout) -> torch.Tensor:
    """Attention output [n, D] of the active tokens; writes their K/V into this pass's cache."""
    attn = layer.attention
    num_heads, head_size = attn.num_heads, attn.head_size
    k_store_BNCH, v_store_BNCH = kv
    x_nD = layer.input_layernorm(x_nD)
    if lay.full:
        q_RNCH, k, v = attn.project(x_nD.view(lay.batch_size, lay.chunk_len, -1), lay.cos, lay.sin)
        k_store_BNCH.narrow(2, lay.past, lay.chunk_len).copy_(k)
        v_store_BNCH.narrow(2, lay.past, lay.chunk_len).copy_(v)
    else:
        # project() works on [B, T, D]: the packed tokens are one "sequence" of length n.
        q, k, v = attn.project(x_nD[None], lay.cos, lay.sin)  # [1, N, n, H]
        k_store_BNCH[lay.batch_n, :, lay.pos_n] = k[0].transpose(0, 1)  # [n, N, H]
        v_store_BNCH[lay.batch_n, :, lay.pos_n] = v[0].transpose(0, 1)
        num_rows = lay.mask.shape[0]
        q_XNH = q.new_zeros(num_rows * lay.width, num_heads, head_size)
        q_XNH[lay.slot_n] = q[0].transpose(0, 1)
        q_RNCH = q_XNH.view(num_rows, lay.width, num_heads, head_size).transpose(1, 2)
    keys_RNSH, values_RNSH = k_store_BNCH.narrow(2, 0, lay.end), v_store_BNCH.narrow(2, 0, lay.end)
    if lay.rows_R is not None:
        keys_RNSH = keys_RNSH.index_select(0, lay.rows_R)
        values_RNSH = values_RNSH.index_select(0, lay.rows_R)
    out_RNCH = F.scaled_dot_product_attention(
        q_RNCH, keys_RNSH, values_RNSH, attn_mask=lay.mask, is_causal=lay.is_causal
    )
    out_XD = out_RNCH.transpose(1, 2).reshape(-1, num_heads * head_size)  # full grid: b-major = packed
    return attn.dense(out_XD if lay.full else out_XD[lay.slot_n])


def _run_pass(
    model: AdaPonderForCausalLM, e_nD: torch.Tensor, kv: list[KVStore], lay: _PassLayout
) -> torch.Tensor:
    """Final-norm output h [n, D] of one pass over the active tokens (`Layer.forward`'s residual)."""
    x_nD = e_nD
    for layer, kv_layer in zip(model.gpt_neox.layers, kv):
        attn_nD = _attention(layer, x_nD, kv_layer, lay)
        if layer.use_parallel_residual:
            x_nD = x_nD + attn_nD + layer.mlp(layer.post_attention_layernorm(x_nD))
        else:
            y_nD = x_nD + attn_nD
            x_nD = y_nD + layer.mlp(layer.post_attention_layernorm(y_nD))
    return model.gpt_neox.final_layer_norm(x_nD)


def _ponder_step(
    model: AdaPonderForCausalLM,
    pass_idx: int,
    h_nD: torch.Tensor,
    e_nD: torch.Tensor,
    flat_n: torch.Tensor | None,
    gates_UX: torch.Tensor | None,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gate, halt and update: E^{i+1} of the tokens that go on to the next pass, and their chunk
    indices (None: every chunk position). Head, softmax and mixture run only for those tokens."""
    cfg = model.config
    if not cfg.adaptive:
        return e_nD + _mixture(model, h_nD), flat_n  # PonderLM: E^{i+1} = E^i + e^i
    s_n = model.ponder_gates[pass_idx](h_nD)  # s^i = sigmoid(MLP_i(h^i)), fp32
    gates_UX[pass_idx, flat_n if flat_n is not None else slice(None)] = s_n
    keep_n = s_n >= tau  # m^{i+1} = m^i * 1[s^i >= tau]
    if not bool(keep_n.all()):
        idx = keep_n.nonzero().squeeze(-1)
        h_nD, e_nD, s_n = h_nD[idx], e_nD[idx], s_n[idx]
        flat_n = idx if flat_n is None else flat_n[idx]
    step_n1 = s_n[:, None].to(e_nD.dtype)  # E^{i+1} = E^i + s^i * e^i (m^{i+1} = 1 here)
    return e_nD + step_n1 * _mixture(model, h_nD), flat_n


def _mixture(model: AdaPonderForCausalLM, h_nD: torch.Tensor) -> torch.Tensor:
    """e^i [n, D] of packed tokens; ponder_embedding works on [B, T, D], here one row of n."""
    return model.ponder_embedding(h_nD[None])[0]


# --------------------------------------------------------------------------------------------------
# The sparse pondering forward.


@dataclass
class SparsePonderResult:
    h_out: torch.Tensor  # [B, T, D] final outputs (last active pass's); 0 at padding positions
    active: torch.Tensor  # [K, B, T] bool, m^i; padding positions count as running pass 0 only
    gates: torch.Tensor | None  # [K-1, B, T] fp32 s^i, 0 where not computed; None if not adaptive
    real: torch.Tensor  # [B, T] bool, real (non-padding) positions of this chunk
    past_real: torch.Tensor  # [B] real tokens cached before this chunk (attention context)


def _chunk_real(
    attention_mask: torch.Tensor | None, batch_size: int, chunk_len: int, past: int, device: torch.device
) -> torch.Tensor:
    """[B, T] bool real-token flags of the new positions. The mask may cover the cached positions
    too (transformers' convention, [B, past + T]) or only the new ones ([B, T])."""
    if attention_mask is None:
        return torch.ones(batch_size, chunk_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
        raise ValueError(f"attention_mask must be [batch, length], got {list(attention_mask.shape)}")
    if attention_mask.shape[1] not in (chunk_len, past + chunk_len):
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions; expected {past + chunk_len} "
            f"(cached {past} + new {chunk_len}) or {chunk_len}"
        )
    return attention_mask[:, -chunk_len:].bool()


@torch.no_grad()
def sparse_ponder(
    model: AdaPonderForCausalLM,
    input_ids_BT: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids_BT: torch.Tensor | None,
    cache: AdaPonderCache,
    tau: float,
    num_run: int,
) -> SparsePonderResult:
    """The pondering loop of SPEC.md section 1 on active tokens only, appending to `cache`.

    `position_ids` default to the cache positions (past .. past + T - 1), like the dense forward's
    arange; generate() passes transformers' left-padding ones. Tokens halt when s^i < `tau`, and
    all stop after pass `num_run` (the max_passes cap). No gradients: inference only.
    """
    cfg = model.config
    b, t = input_ids_BT.shape
    past, device = cache.get_seq_length(), input_ids_BT.device
    real_BT = _chunk_real(attention_mask, b, t, past, device)
    if position_ids_BT is None:
        position_ids_BT = torch.arange(past, past + t, device=device).expand(b, t)
    elif position_ids_BT.shape != (b, t):
        raise ValueError(f"position_ids must be [{b}, {t}] like input_ids, got {list(position_ids_BT.shape)}")
    past_real_B = cache.real.sum(-1) if past else torch.zeros(b, dtype=torch.long, device=device)
    cache.reserve(b, past + t, model.dtype, device)
    cache._real_BC[:, past : past + t] = real_BT
    real_BS = cache._real_BC[:, : past + t]
    chunk_all_real = bool(real_BT.all())
    keys_all_real = chunk_all_real and bool(real_BS.all())

    cos, sin = rotary_cos_sin(position_ids_BT, cfg.rotary_ndims, cfg.rotary_emb_base, model.dtype)
    cos_XR, sin_XR = cos[:, 0].reshape(b * t, -1), sin[:, 0].reshape(b * t, -1)
    ids_X = input_ids_BT.reshape(-1)
    # Active chunk positions (indices into B*T), None while that is all of them; padding never runs.
    flat_n = None if chunk_all_real else real_BT.reshape(-1).nonzero().squeeze(-1)
    n_real = b * t if flat_n is None else flat_n.numel()
    # E^0 = embed_in(x) * embed_scale * base_mult
    e_nD = model.gpt_neox.embed_in(ids_X if flat_n is None else ids_X[flat_n]) * (
        cfg.embed_scale * cfg.base_mult
    )
    h_out_XD = e_nD.new_zeros(b * t, cfg.hidden_size)
    active_KX = torch.zeros(cfg.num_passes, b * t, dtype=torch.bool, device=device)
    active_KX[0] = True
    has_gates = cfg.adaptive and cfg.num_passes > 1
    gates_UX = torch.zeros(cfg.num_passes - 1, b * t, device=device) if has_gates else None
    for i in range(cfg.num_passes):
        n = 0 if i >= num_run else b * t if flat_n is None else flat_n.numel()
        if i > 0 and n < n_real and not (cache.scratch and i >= num_run):
            cache.carry_forward(i, past, past + t)
        if n == 0:
            continue  # nothing active: the pass is skipped (its cache entries carried above)
        if flat_n is None:
            lay = _full_layout(b, t, past, cos, sin, real_BS, keys_all_real)
            h_nD = _run_pass(model, e_nD, cache.layer_kv(i), lay)
            h_out_XD.copy_(h_nD)
        else:
            active_KX[i, flat_n] = True
            lay = _packed_layout(flat_n, b, t, past, cos_XR, sin_XR, real_BS)
            h_nD = _run_pass(model, e_nD, cache.layer_kv(i), lay)
            h_out_XD[flat_n] = h_nD  # overwritten each pass: ends as the last active pass's output
        if i < num_run - 1:
            e_nD, flat_n = _ponder_step(model, i, h_nD, e_nD, flat_n, gates_UX, tau)
            if flat_n is None:
                active_KX[i + 1] = True
    active_KBT = active_KX.view(-1, b, t)
    cache._passes_BC[:, past : past + t] = (active_KBT.sum(0) * real_BT).to(torch.uint8)
    cache.seq_length = past + t
    return SparsePonderResult(
        h_out=h_out_XD.view(b, t, -1),
        active=active_KBT,
        gates=gates_UX.view(cfg.num_passes - 1, b, t) if has_gates else None,
        real=real_BT,
        past_real=past_real_B,
    )

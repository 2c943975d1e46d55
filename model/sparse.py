"""Packed pondering: each pass runs only the tokens still active, forward and backward.

The dense formulation (modeling.py `_ponder`) runs every token in every pass and uses `where` to make
a halted token look frozen (docs/method.md, "K/V reuse"). Here the same function is computed
sparsely (docs/method.md, "Skipping halted tokens"): in pass i only the active tokens (m^i = 1) of
the whole batch are gathered into one packed [n, D] matrix, run through the layers, and scattered
back; a halted token is never computed again, and every later pass attends to its last active
pass's K/V, which is what the dense K = where(m^i, K_new, K_prev) simulates. After pass i the gate
runs for the active tokens, the head + mixture (e^i) only for those that continue to pass i+1.

Skipping is exact in the forward and in the gradients: what a halted token would compute later never
reaches the loss in the dense formulation either (its outputs and K/V are replaced by `where`).

One loop serves training, evaluation and cached inference; they differ in where the aligned K/V of a
pass live (`KVStore`):
  - `AlignedKV` (no cache: training and the evaluation forward): pass i's K/V are a new tensor,
    the previous pass's with the active tokens' rows replaced out of place (index_put), so autograd
    sees every value it needs; under no_grad the previous pass's tensors are freed as soon as the
    next one exists (two passes' K/V held, like a decoder's cache).
  - model.inference.AdaPonderCache (generation): one preallocated slot per pass, written in place;
    a call appends T new positions after `past` cached ones.

ZeRO-3: with `uniform_calls`, every module of every pass runs even when this rank has no active
token left (with a [0, D] batch), so that all ranks gather the same parameters in the same order.

Plain PonderLM (`adaptive=False`: nobody halts) and K = 1 (Pythia) are the special cases where every
token is active in every pass; they take the same code path with no gather or scatter.

Shapes use the legend of modeling.py, plus: n active tokens of a pass (packed), R sequences with an
active token, C the widest such sequence (padded query grid), X = B*T flattened chunk positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor | None, torch.Tensor | None]  # one layer's aligned keys, values [B, N, S, H]


@dataclass
class PassLayout:
    """Where the active tokens of one pass sit in the K/V store and in the attention batch.

    Full grid (every chunk position is real and active, e.g. decode, or training before anyone
    halts): the tokens are the chunk itself, [B, T], and need no gather or scatter. Otherwise the n
    active tokens are packed, [n, D], for everything but attention, which runs on a padded query grid
    [R, C]: row r is the r-th sequence with an active token, whose active tokens fill its first
    columns in position order.
    """

    batch_size: int
    chunk_len: int
    past: int  # positions in the store before this chunk (0 without a cache)
    in_place: bool  # write K/V into the store (cache) or return new tensors (autograd)
    cos: torch.Tensor  # rotary tables of the queries: [B, 1, T, R] (full grid) or [1, 1, n, R]
    sin: torch.Tensor
    batch_n: torch.Tensor | None = None  # [n] sequence of each packed token
    pos_n: torch.Tensor | None = None  # [n] its store position
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


def full_layout(
    b: int,
    t: int,
    past: int,
    in_place: bool,
    cos: torch.Tensor,
    sin: torch.Tensor,
    real_BS: torch.Tensor,
    keys_all_real: bool,
) -> PassLayout:
    if keys_all_real and (t == 1 or past == 0):
        # One query per sequence sees every key; a fresh chunk is plainly causal.
        return PassLayout(b, t, past, in_place, cos, sin, is_causal=t > 1)
    q_pos_BT = (past + torch.arange(t, device=real_BS.device)).expand(b, t)
    return PassLayout(b, t, past, in_place, cos, sin, mask=_visible(q_pos_BT, real_BS))


def packed_layout(
    flat_n: torch.Tensor,
    b: int,
    t: int,
    past: int,
    in_place: bool,
    cos_XR: torch.Tensor,
    sin_XR: torch.Tensor,
    real_BS: torch.Tensor,
) -> PassLayout:
    """Layout of the active chunk positions `flat_n` (sorted indices into B*T; may be empty)."""
    n, device = flat_n.numel(), flat_n.device
    batch_n, pos_n = flat_n // t, past + flat_n % t
    rows_R, counts_R = torch.unique_consecutive(batch_n, return_counts=True)
    num_rows, width = rows_R.numel(), int(counts_R.max()) if n else 0
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
    return PassLayout(b, t, past, in_place, cos_n, sin_n, batch_n, pos_n, rows, slot_n, width, mask)


def _store(store_BNSH: torch.Tensor | None, new_nNH: torch.Tensor, lay: PassLayout) -> torch.Tensor:
    """The aligned K (or V) of this pass: `store` with the packed tokens' rows replaced."""
    if store_BNSH is None:  # nothing computed before (padding in pass 0): zeros, like a fresh cache
        n_heads, head_size = new_nNH.shape[1:]
        store_BNSH = new_nNH.new_zeros(lay.batch_size, n_heads, lay.end, head_size)
    index = (lay.batch_n, lay.pos_n)
    if lay.in_place:
        store_BNSH.transpose(1, 2).index_put_(index, new_nNH)
        return store_BNSH
    return store_BNSH.transpose(1, 2).index_put(index, new_nNH).transpose(1, 2)


class _Supersede(torch.autograd.Function):
    """`new` as it is, with a zero gradient for `old`: a pass that every token runs replaces all of
    the previous pass's K/V. The edge to `old` keeps the autograd graph the same shape on a rank
    whose tokens all run as on one where some halted (the previous pass's K/V then receive
    gradients through index_put); ZeRO-3 checks that every rank's backward runs the same module
    hooks in the same order."""

    @staticmethod
    def forward(ctx, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        ctx.old_shape = old.shape
        return new.view_as(new)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.new_zeros(ctx.old_shape)


def packed_attention(
    attn: nn.Module,
    x_nD: torch.Tensor,
    k_prev: torch.Tensor | None,
    v_prev: torch.Tensor | None,
    lay: PassLayout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output [n, D] of the active tokens (`x` after the input norm), and this pass's
    aligned keys and values [B, N, S, H] (the store itself when written in place)."""
    num_heads, head_size = attn.num_heads, attn.head_size
    if lay.full:
        q_RNCH, k, v = attn.project(x_nD.view(lay.batch_size, lay.chunk_len, -1), lay.cos, lay.sin)
        if lay.in_place:
            k_prev.narrow(2, lay.past, lay.chunk_len).copy_(k)
            v_prev.narrow(2, lay.past, lay.chunk_len).copy_(v)
            keys, values = k_prev, v_prev
        elif k_prev is not None:
            keys, values = _Supersede.apply(k, k_prev), _Supersede.apply(v, v_prev)
        else:
            keys, values = k, v
    else:
        # project() works on [B, T, D]: the packed tokens are one "sequence" of length n.
        q, k, v = attn.project(x_nD[None], lay.cos, lay.sin)  # [1, N, n, H]
        keys = _store(k_prev, k[0].transpose(0, 1), lay)
        values = _store(v_prev, v[0].transpose(0, 1), lay)
        num_rows = lay.mask.shape[0]
        q_XNH = q.new_zeros(num_rows * lay.width, num_heads, head_size).index_put(
            (lay.slot_n,), q[0].transpose(0, 1)
        )
        q_RNCH = q_XNH.view(num_rows, lay.width, num_heads, head_size).transpose(1, 2)
    keys_RNSH, values_RNSH = keys.narrow(2, 0, lay.end), values.narrow(2, 0, lay.end)
    if lay.rows_R is not None:
        keys_RNSH = keys_RNSH.index_select(0, lay.rows_R)
        values_RNSH = values_RNSH.index_select(0, lay.rows_R)
    out_RNCH = F.scaled_dot_product_attention(
        q_RNCH, keys_RNSH, values_RNSH, attn_mask=lay.mask, is_causal=lay.is_causal
    )
    out_XD = out_RNCH.transpose(1, 2).reshape(-1, num_heads * head_size)  # full grid: b-major = packed
    return attn.dense(out_XD if lay.full else out_XD[lay.slot_n]), keys, values


# --------------------------------------------------------------------------------------------------
# Where a pass's aligned K/V live.


class KVStore(Protocol):
    in_place: bool

    def layer_kv(self, pass_idx: int) -> list[KV]:
        """Per layer, the store pass `pass_idx` writes its active tokens' K/V into."""

    def carry_forward(self, pass_idx: int) -> None:
        """Before pass `pass_idx` > 0 when some real token does not run it: halted tokens keep their
        last active pass's K/V in this pass's store."""

    def update(self, pass_idx: int, kv: list[KV]) -> None:
        """The aligned K/V pass `pass_idx` produced, per layer."""


class AlignedKV:
    """Each pass's aligned K/V as new tensors (out-of-place row replacement), for autograd."""

    in_place = False

    def __init__(self, num_layers: int) -> None:
        self._kv: list[KV] = [(None, None)] * num_layers

    def layer_kv(self, pass_idx: int) -> list[KV]:
        return self._kv

    def carry_forward(self, pass_idx: int) -> None:
        return None  # the previous pass's tensors are the starting point of the replacement

    def update(self, pass_idx: int, kv: list[KV]) -> None:
        self._kv = kv


# --------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class PonderResult:
    h_out: torch.Tensor  # [B, T, D] final outputs (last active pass's); 0 at padding positions
    active: torch.Tensor  # [K, B, T] bool, m^i; padding positions count as running pass 0 only
    gates: torch.Tensor | None  # [K-1, B, T] fp32 s^i, 0 where not computed; None if not adaptive


def ponder_packed(
    model: Any,
    input_ids_BT: torch.Tensor,
    real_BT: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: KVStore,
    past: int,
    real_BS: torch.Tensor,
    tau: float,
    num_run: int,
    exit_passes_BT: torch.Tensor | None = None,
    uniform_calls: bool = False,
    pass0_h_BTD: torch.Tensor | None = None,
) -> PonderResult:
    """The pondering loop of docs/method.md on active tokens only.

    `model` is an AdaPonderForCausalLM. `cos`/`sin` [B, 1, T, R] are the chunk's rotary tables;
    `real_BS` flags the real positions of the store (the `past` cached ones, then the chunk's).
    Tokens halt when s^i < `tau` (or after `exit_passes_BT` passes: fixed pruning), and all stop
    after pass `num_run`. Without `uniform_calls` a pass with no active token is skipped.
    With `pass0_h_BTD` pass 0 already ran for this chunk (a self-speculative draft: its K/V are in
    the store, carried into every pass) and these are its outputs h^0: the loop goes on from them.
    """
    cfg = model.config
    b, t = input_ids_BT.shape
    device = input_ids_BT.device
    chunk_all_real = bool(real_BT.all())
    keys_all_real = chunk_all_real and bool(real_BS.all())
    cos_XR, sin_XR = cos[:, 0].reshape(b * t, -1), sin[:, 0].reshape(b * t, -1)
    ids_X = input_ids_BT.reshape(-1)
    exit_X = exit_passes_BT.reshape(-1) if exit_passes_BT is not None else None
    # Active chunk positions (indices into B*T), None while that is all of them; padding never runs.
    flat_n = None if chunk_all_real else real_BT.reshape(-1).nonzero().squeeze(-1)
    n_real = b * t if flat_n is None else flat_n.numel()
    # E^0 = embed_in(x) * embed_scale * base_mult
    e_nD = model.gpt_neox.embed_in(ids_X if flat_n is None else ids_X[flat_n]) * (
        cfg.embed_scale * cfg.base_mult
    )
    h_out_XD = e_nD.new_zeros(b * t, cfg.hidden_size)
    active_KX = torch.zeros(cfg.num_passes, b * t, dtype=torch.bool, device=device)
    active_KX[0] = True  # padding counts as running pass 0 only
    gates = []
    for i in range(cfg.num_passes):
        n = 0 if i >= num_run else b * t if flat_n is None else flat_n.numel()
        if i > 0 and n < n_real:
            kv.carry_forward(i)
        if i >= num_run or (n == 0 and not uniform_calls):
            continue  # nothing active: the pass is skipped (its K/V carried above)
        if flat_n is None:
            lay = full_layout(b, t, past, kv.in_place, cos, sin, real_BS, keys_all_real)
            active_KX[i] = True
        else:
            lay = packed_layout(flat_n, b, t, past, kv.in_place, cos_XR, sin_XR, real_BS)
            active_KX[i, flat_n] = True
        if i == 0 and pass0_h_BTD is not None:
            h_nD = pass0_h_BTD.reshape(b * t, -1)
            h_nD = h_nD if flat_n is None else h_nD[flat_n]
        else:
            h_nD = run_pass(model, e_nD, kv, i, lay)
        # Overwritten each pass: ends as the last active pass's output.
        h_out_XD = h_nD if flat_n is None else h_out_XD.index_put((flat_n,), h_nD)
        if i < num_run - 1:
            e_nD, flat_n, gate_X = _ponder_step(model, i, h_nD, e_nD, flat_n, b * t, tau, exit_X)
            gates.append(gate_X)
    has_gates = cfg.adaptive and cfg.num_passes > 1
    if has_gates:
        gates += [h_out_XD.new_zeros(b * t, dtype=torch.float32)] * (cfg.num_passes - 1 - len(gates))
    return PonderResult(
        h_out=h_out_XD.view(b, t, -1),
        active=active_KX.view(-1, b, t),
        gates=torch.stack(gates).view(-1, b, t) if has_gates else None,
    )


def run_pass(model: Any, e_nD: torch.Tensor, kv: KVStore, pass_idx: int, lay: PassLayout) -> torch.Tensor:
    """Final-norm output h [n, D] of one pass over the active tokens."""
    x_nD, new_kv = e_nD, []
    for layer, (k_prev, v_prev) in zip(model.gpt_neox.layers, kv.layer_kv(pass_idx)):
        # Positional tensors: activation checkpointing passes their gradients through.
        x_nD, k, v = layer(x_nD, None, None, None, k_prev, v_prev, layout=lay)
        new_kv.append((k, v))
    kv.update(pass_idx, new_kv)
    return model.gpt_neox.final_layer_norm(x_nD)


def _ponder_step(
    model: Any,
    pass_idx: int,
    h_nD: torch.Tensor,
    e_nD: torch.Tensor,
    flat_n: torch.Tensor | None,
    num_positions: int,
    tau: float,
    exit_X: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gate, halt and update: E^{i+1} of the tokens that go on to the next pass, their chunk indices
    (None: every chunk position) and s^i [X] (0 where not computed). Head + mixture run only for the
    tokens that go on."""
    cfg = model.config
    if not cfg.adaptive:
        return (
            e_nD + model.ponder_embedding(h_nD),
            flat_n,
            None,
        )  # PonderLM: E^{i+1} = E^i + e^i
    s_n = model.ponder_gates[pass_idx](h_nD)  # s^i = sigmoid(MLP_i(h^i)), fp32
    gate_X = s_n if flat_n is None else s_n.new_zeros(num_positions).index_put((flat_n,), s_n)
    # m^{i+1} = m^i * 1[s^i >= tau] (hard, no gradient), or the fixed exit pass.
    if exit_X is None:
        keep_n = s_n.detach() >= tau
    else:
        keep_n = (exit_X if flat_n is None else exit_X[flat_n]) > pass_idx + 1
    if not bool(keep_n.all()):
        idx = keep_n.nonzero().squeeze(-1)
        h_nD, e_nD, s_n = h_nD[idx], e_nD[idx], s_n[idx]
        flat_n = idx if flat_n is None else flat_n[idx]
    step_n1 = s_n[:, None].to(e_nD.dtype)  # E^{i+1} = E^i + s^i * e^i (m^{i+1} = 1 here)
    return e_nD + step_n1 * model.ponder_embedding(h_nD), flat_n, gate_X

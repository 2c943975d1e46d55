"""How a pass addresses K/V: which rows it computes, where their keys and values go, what they attend.

The rule K = where(m^i, K_new, K_prev) of model/ponder.py, addressed three ways:
  - every row (`aligned_where`): every token computes K/V and `where` keeps a halted token's;
  - packed (`PassLayout` with `slot_n`): only the active tokens of the batch, [n, D], are computed;
    their K/V rows replace the previous pass's in the K/V store (`_store`), and attention runs on a
    query grid of R rows (row r: the r-th sequence with an active token). Without a cache and with
    padding only on the right (training, the evaluation forward) a token's query sits at its own
    position of an [R, L] grid under plain causal attention: no mask, no T^2 tensor, and SDPA's
    fused kernels apply (flash on CPU and GPU; tests/test_fused_attention.py). A cached chunk or a
    left-padded prefill packs the active tokens into an [R, C] grid with a [R, 1, C, S] mask
    (C at most the chunk's length);
  - full grid (`PassLayout` without `slot_n`): every chunk position is real and active (decode, or
    training before anyone halts), [B, T], no gather or scatter.

Where the aligned K/V of a pass live (`KVStore`):
  - `AlignedKV` (no cache: training and the evaluation forward): pass i's K/V are a new tensor,
    the previous pass's with the active tokens' rows replaced out of place (index_put), so autograd
    sees every value it needs; under no_grad the previous pass's tensors are freed as soon as the
    next one exists (two passes' K/V held, like a decoder's cache).
  - model.inference.AdaPonderCache (generation): one preallocated slot per pass, written in place;
    a call appends T new positions after `past` cached ones.

Shapes use the legend of modeling.py, plus: n active tokens of a pass (packed), R sequences with an
active token, C the widest such sequence (padded query grid), X = B*T flattened chunk positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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
    width: int = 0  # C (masked grid) or L (causal grid)
    mask: torch.Tensor | None = None  # [R, 1, C, S] bool, True: attend; None: see is_causal
    is_causal: bool = False

    @property
    def full(self) -> bool:
        return self.slot_n is None

    @property
    def end(self) -> int:
        return self.past + self.chunk_len

    @property
    def key_len(self) -> int:
        """Store positions attention reads: a causal query grid's L (its queries sit at their own
        positions, so none sees a key past L), else all of them."""
        return self.width if self.is_causal and not self.full else self.end

    @property
    def num_rows(self) -> int:
        """R, the query grid's rows (a static shape: no synchronisation)."""
        return self.batch_size if self.rows_R is None else self.rows_R.shape[0]


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


@dataclass
class Rows:
    """A selection of chunk positions, with its sizes on the host (read in one transfer by
    model.ponder.read_host, so that building its layout needs no synchronisation)."""

    n: int  # tokens selected
    num_rows: int  # R: sequences with a selected token
    width: int  # C: most tokens selected in one sequence
    span: int  # L: most chunk positions up to and including a sequence's last selected token
    counts_B: torch.Tensor  # [B] tokens selected per sequence (on the device)
    # The chunk's real tokens are a prefix of every sequence (no padding, or padding on the right
    # only): with no cached positions, causal attention then never lets a real query see padding.
    real_prefix: bool = False


def packed_layout(
    flat_n: torch.Tensor,
    rows: Rows,
    b: int,
    t: int,
    past: int,
    in_place: bool,
    cos_XR: torch.Tensor,
    sin_XR: torch.Tensor,
    real_BS: torch.Tensor,
    causal: bool,
) -> PassLayout:
    """Layout of the selected chunk positions `flat_n` (sorted indices into B*T; may be empty).

    `causal` (no cached positions, real tokens a prefix of every sequence: training and the
    evaluation forward): the query grid is [R, L], a token at its own position, and attention is
    plainly causal over the first L keys, so no mask exists and fused kernels (flash, memory
    efficient) apply. Grid slots of halted or padding positions query with zeros and are discarded.
    Otherwise (a cached chunk, left padding) the grid is [R, C], the active tokens of a row packed
    into its first columns, with a [R, 1, C, S] mask; C is at most the chunk's length there.
    """
    n, device = rows.n, flat_n.device
    batch_n, pos_n = flat_n // t, past + flat_n % t
    has_B = rows.counts_B > 0
    rows_R = torch.nonzero_static(has_B, size=rows.num_rows).squeeze(-1)
    row_n = (has_B.cumsum(0) - 1)[batch_n]  # grid row of each token's sequence
    all_rows = rows.num_rows == b
    cos_n, sin_n = cos_XR[flat_n][None, None], sin_XR[flat_n][None, None]  # [1, 1, n, R]
    sel = None if all_rows else rows_R
    if causal:
        assert past == 0, "a causal grid's queries sit at their positions from the chunk's start"
        slot_n = row_n * rows.span + pos_n
        layout = (batch_n, pos_n, sel, slot_n, rows.span)
        return PassLayout(b, t, past, in_place, cos_n, sin_n, *layout, is_causal=True)
    first_B = rows.counts_B.cumsum(0) - rows.counts_B  # its sequence's first packed index
    slot_n = row_n * rows.width + torch.arange(n, device=device) - first_B[batch_n]
    # Unused grid slots query the last position: a finite row (the sequence has a real key), discarded.
    q_pos_X = torch.full((rows.num_rows * rows.width,), past + t - 1, dtype=torch.long, device=device)
    q_pos_X[slot_n] = pos_n
    mask = _visible(q_pos_X.view(rows.num_rows, rows.width), real_BS if all_rows else real_BS[rows_R])
    return PassLayout(b, t, past, in_place, cos_n, sin_n, batch_n, pos_n, sel, slot_n, rows.width, mask)


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
        num_rows = lay.num_rows
        q_XNH = q.new_zeros(num_rows * lay.width, num_heads, head_size).index_put(
            (lay.slot_n,), q[0].transpose(0, 1)
        )
        q_RNCH = q_XNH.view(num_rows, lay.width, num_heads, head_size).transpose(1, 2)
    keys_RNSH, values_RNSH = keys.narrow(2, 0, lay.key_len), values.narrow(2, 0, lay.key_len)
    if lay.rows_R is not None:
        keys_RNSH = keys_RNSH.index_select(0, lay.rows_R)
        values_RNSH = values_RNSH.index_select(0, lay.rows_R)
    if q_RNCH.shape[0] == 0:
        # No active token (the pass still runs: uniform_calls). Fused SDPA kernels reject an empty
        # batch; the product of empty tensors is empty and keeps q, k, v in the graph.
        out_RNCH = (q_RNCH @ keys_RNSH.transpose(-1, -2)).softmax(-1) @ values_RNSH
    else:
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


def aligned_where(
    active_BT: torch.Tensor,
    k_BNTH: torch.Tensor,
    v_BNTH: torch.Tensor,
    k_prev: torch.Tensor,
    v_prev: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row computed: K = where(m^i, K_new, K_prev). K_prev is the previous pass's aligned K/V,
    so a token halted several passes ago keeps its last active pass's."""
    keep_B1T1 = active_BT[:, None, :, None]
    return torch.where(keep_B1T1, k_BNTH, k_prev), torch.where(keep_B1T1, v_BNTH, v_prev)

"""The per-pass KV cache of adaptive inference (prefill and decode); the loop is model/ponder.py.

A call with a cache appends T new positions: queries attend over all cached positions of their
pass, and a token that halts is never computed again while the cache holds its last active pass's
K/V in every later pass (what the dense K = where(m^i, K_new, K_prev) simulates). Prefill and decode
are the same code. A pass with no active token is skipped, its cache entries carried forward
(later tokens attend to them).
"""

from __future__ import annotations

import torch

from model.config import AdaPonderConfig

LayerKV = tuple[torch.Tensor, torch.Tensor]  # one pass and layer's keys and values, [B, N, capacity, H]


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

    # Read by transformers' generate(): no static shapes, no compilation; rollback through crop().
    is_compileable = False
    is_croppable = True

    in_place = True  # model.kv.KVStore: passes write their K/V into their slots

    def __init__(self, config: AdaPonderConfig, max_length: int | None = None) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.num_passes = config.num_passes
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.max_length = max_length
        self.kv: torch.Tensor | None = None  # [K, L, 2, B, N, capacity, H]
        self._layer_kv: list[list[LayerKV]] = []  # views of kv per pass and layer, made once
        self._real_BC: torch.Tensor | None = None  # bool: position is a real token (not padding)
        self._passes_BC: torch.Tensor | None = None  # uint8: passes run (0 for padding)
        self.seq_length = 0
        self.all_real = True  # no padding cached (kept conservatively: a crop does not reset it)
        self._chunk = (0, 0)  # positions [start, end) the current call writes

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
        return self._stored()[pass_idx, layer_idx, 0, :, :, : self.seq_length]

    def values(self, pass_idx: int, layer_idx: int) -> torch.Tensor:
        """Aligned values [B, N, S, H], as `keys`."""
        return self._stored()[pass_idx, layer_idx, 1, :, :, : self.seq_length]

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

    def layer_kv(self, pass_idx: int) -> list[LayerKV]:
        """(keys, values) [B, N, capacity, H] of every layer of one pass, beyond the used length too."""
        return self._layer_kv[pass_idx]

    def _stored(self) -> torch.Tensor:
        if self.kv is None:
            raise ValueError("the cache is empty: no forward has written to it yet")
        return self.kv

    def reserve(self, batch_size: int, length: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make room for `length` positions of `batch_size` sequences, keeping what is cached."""
        if self.kv is not None and batch_size != self.batch_size:
            raise ValueError(f"the cache holds a batch of {self.batch_size} sequences, got {batch_size}")
        if self.kv is not None and (dtype != self.kv.dtype or device != self.kv.device):
            raise ValueError(f"the cache holds {self.kv.dtype} on {self.kv.device}, got {dtype} on {device}")
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity, self.max_length or 0)
        shape = (self.num_passes, self.num_layers, 2, batch_size, self.num_heads, capacity, self.head_size)
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

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions (negative: drop that many from the end), as
        transformers' `DynamicCache.crop`. The dropped positions are zeroed like never-written
        capacity, so the cache equals one that never held them (speculative decoding's rollback)."""
        keep = self.seq_length + max_length if max_length < 0 else max_length
        if keep >= self.seq_length:
            return
        if keep < 0:
            raise ValueError(f"cannot crop {self.seq_length} cached positions to {max_length}")
        self._stored()[..., keep : self.seq_length, :] = 0
        self._real_BC[:, keep : self.seq_length] = False
        self._passes_BC[:, keep : self.seq_length] = 0
        self.seq_length = keep

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep sequences `beam_idx` [B'] in that order (generate()'s beam search calls this)."""
        kv = self._stored()
        self._set(kv.index_select(3, beam_idx), self._real_BC[beam_idx], self._passes_BC[beam_idx])

    def _set(self, kv: torch.Tensor, real_BC: torch.Tensor, passes_BC: torch.Tensor) -> None:
        self.kv, self._real_BC, self._passes_BC = kv, real_BC, passes_BC
        self._layer_kv = [
            [(kv[i, j, 0], kv[i, j, 1]) for j in range(self.num_layers)] for i in range(self.num_passes)
        ]

    def begin_chunk(self, real_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for a call's T new positions (`real_BT` flags padding); returns the real
        tokens cached before them [B] and the real flags of every position then held [B, S]."""
        b, t = real_BT.shape
        past = self.seq_length
        past_real_B = self.real.sum(-1) if past else torch.zeros(b, dtype=torch.long, device=real_BT.device)
        self.reserve(b, past + t, dtype, real_BT.device)
        self._real_BC[:, past : past + t] = real_BT
        self.all_real = self.all_real and bool(real_BT.all())
        self._chunk = (past, past + t)
        return past_real_B, self._real_BC[:, : past + t]

    def open_step(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Make room for one real new position per sequence (model.ponder.decode_step); returns the
        real flags of every position then held [B, S]. No host sync."""
        past = self.seq_length
        self.reserve(batch_size, past + 1, dtype, device)
        self._real_BC[:, past] = True
        return self._real_BC[:, : past + 1]

    def record_step(self, passes: torch.Tensor | int) -> None:
        """Close open_step's position: the passes it ran ([B], or one count for every sequence)."""
        self._passes_BC[:, self.seq_length] = passes
        self.seq_length += 1

    def reopen_chunk(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Make the last `length` cached positions the current call's chunk again, to run more
        passes for them (speculative verification after a pass-1 draft); returns as begin_chunk."""
        past = self.seq_length - length
        self._chunk = (past, self.seq_length)
        return self.real[:, :past].sum(-1), self.real

    def end_chunk(self, active_KBT: torch.Tensor, real_BT: torch.Tensor) -> None:
        """Record the passes each new position ran; they become part of the cached context."""
        start, end = self._chunk
        self._passes_BC[:, start:end] = (active_KBT.sum(0) * real_BT).to(torch.uint8)
        self.seq_length = end

    def carry_forward(self, pass_idx: int) -> None:
        """Copy the call's positions of pass `pass_idx - 1` into pass `pass_idx`, all layers: a
        token that halts before this pass keeps its last active K/V (active tokens overwrite)."""
        self.copy_pass(pass_idx - 1, slice(pass_idx, pass_idx + 1), slice(*self._chunk))

    def copy_pass(self, source: int, targets: slice, positions: slice) -> None:
        """Pass `source`'s K/V at `positions`, every layer and sequence, into passes `targets`: the
        passes a halted token did not run hold its last run pass's K/V (docs/method.md, "K/V reuse")."""
        kv = self._stored()
        kv[targets, ..., positions, :] = kv[source, ..., positions, :]

    def update(self, pass_idx: int, kv: list[LayerKV]) -> None:
        return None  # written in place during the pass


def checked_cache(cache: object, config: AdaPonderConfig, max_length: int | None = None) -> AdaPonderCache:
    """`cache` if it is an AdaPonderCache, a new one if it is None; a ValueError otherwise."""
    if cache is None:
        return AdaPonderCache(config, max_length)
    if not isinstance(cache, AdaPonderCache):
        raise ValueError(f"cache must be a model.inference.AdaPonderCache, got {type(cache).__name__}")
    shape = (config.num_passes, config.num_hidden_layers, config.num_attention_heads, config.head_size)
    if (cache.num_passes, cache.num_layers, cache.num_heads, cache.head_size) != shape:
        raise ValueError(
            f"the cache was made for (passes, layers, heads, head size) = "
            f"{(cache.num_passes, cache.num_layers, cache.num_heads, cache.head_size)}, the model has {shape}"
        )
    return cache


def chunk_real(
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

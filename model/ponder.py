"""The pondering engine: the rule of AdaPonderLM written once, and the strategies that execute it.

The rule (one pondering update after pass i; the AdaPonderLM paper, arXiv 2603.01914):

    E^0     = embed_in(x) * embed_scale * base_mult                      `first_input`
    s^i     = sigmoid(MLP_i(h^i))              fp32                       `gate`
    m^{i+1} = m^i * 1[s^i >= tau]              hard, monotonic, no grad   `continues`
    E^{i+1} = E^i + m^{i+1} * s^i * e^i,  e^i = P^i @ (W_in * scale)       `next_input`
    K, V    = where(m^i, K_new, K_prev) in every layer                    model/kv.py
    h_out   = where(m^i, h^i, h_out_prev)

Plain PonderLM (`adaptive=False`) has no gate and nobody halts: E^{i+1} = E^i + e^i.
`exit_passes` (passes per token, 1..K) replaces the threshold decision for fixed-pruning baselines;
the gates still scale the updates. Only the first `num_run` passes run (the `max_passes` cap).

One loop executes it (`ponder_loop`, which reads top to bottom beside the lines above), driving
one of three strategies (`Strategy`) that differ only in which rows a pass computes and how it
addresses K/V (model/kv.py):
  - every row (`EveryRow`; `ponder_every_row`, `dense=True`): every token runs every pass and
    `where` makes a halted token look frozen. It is the definition and the tests' oracle. It is
    never faster than the packed strategy, which with nobody halting runs the same full passes
    (BENCHMARKS.md, "Sparse vs dense training step"), so nothing takes it by default; it stays
    reachable (`ponder.sparse_training: false`) to check a run against the definition itself.
  - packed (`PackedRows`; `ponder_packed`): pass i gathers the active tokens (m^i = 1) of the whole
    batch into one [n, D] matrix; a halted token is never computed again, and later passes attend
    to its last active pass's K/V. Exact in the forward and in the gradients: nothing a halted
    token would compute later reaches the loss in the definition either. Training, evaluation and
    cached prefill; the K/V store decides where K/V live.
  - one token per sequence with a cache (`DecodeRows`; `decode_step`): every row of a small batch
    runs every pass any row runs, in the fixed [B, 1] shape (a row more reads the same weights);
    `where` keeps a halted row's output and K/V, as in the definition. At batch 1 a halt ends the
    loop.

ZeRO-3: with `uniform_calls` (the model's `every_rank_calls_every_module`, which training/engine.py
turns on) every module of every pass runs even when this rank has no active token left (with a
[0, D] batch), so that all ranks gather the same parameters in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model.inference import AdaPonderCache
from model.kv import KVStore, PassLayout, Rows, full_layout, packed_layout

# --------------------------------------------------------------------------------------------------
# The rule.


def first_input(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """E^0 = embed_in(x) * embed_scale * base_mult, [..., D]."""
    cfg = model.config
    return model.gpt_neox.embed_in(ids) * (cfg.embed_scale * cfg.base_mult)


def gate(model: Any, pass_idx: int, h: torch.Tensor) -> torch.Tensor:
    """s^i = sigmoid(MLP_i(h^i)) [...], fp32 so that s < tau is decided at full precision."""
    return model.ponder_gates[pass_idx](h)


def continues(s: torch.Tensor, tau: float, pass_idx: int, exit_passes: torch.Tensor | None) -> torch.Tensor:
    """1[s^i >= tau] (hard, no gradient), or the fixed exit: more than pass_idx + 1 passes (`s` may
    then be None: plain PonderLM)."""
    return s.detach() >= tau if exit_passes is None else exit_passes > pass_idx + 1


def next_input(
    e: torch.Tensor, e_ponder: torch.Tensor, s: torch.Tensor | None, live: torch.Tensor | None = None
) -> torch.Tensor:
    """E^{i+1} = E^i + m^{i+1} * s^i * e^i, with e^i = `e_ponder` (model.ponder_embedding(h^i));
    `live` is m^{i+1} (None: every row goes on), `s` None for plain PonderLM (E^i + e^i)."""
    if s is None:
        return e + e_ponder
    step = s if live is None else live * s
    return e + step[..., None].to(e.dtype) * e_ponder


def checked_exits(
    input_ids: torch.Tensor,
    exit_passes: torch.Tensor | None,
    confidence: float | None,
    gate_scaling: bool,
    cached: bool,
) -> dict[str, Any]:
    """A forward's exits other than the gates', checked (ValueError naming the argument), as
    `ponder_loop`'s arguments. The values of exit_passes are checked in `first_read`."""
    if exit_passes is not None and exit_passes.shape != input_ids.shape:
        raise ValueError(
            f"exit_passes has shape {tuple(exit_passes.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    if confidence is not None and not 0.0 < confidence <= 1.0:
        raise ValueError(f"exit_confidence must be in (0, 1], got {confidence}")
    if cached and (confidence is not None or not gate_scaling):
        raise ValueError("exit_confidence and gate_scaling=False are for uncached calls (evaluation)")
    return {"exit_confidence": confidence, "gate_scaling": gate_scaling}


def adaptive_gates(config: Any) -> bool:
    return config.adaptive and config.num_passes > 1


def read_host(*scalars: torch.Tensor) -> list[int]:
    """The engine's synchronisation point: integer scalars on the device, read in one
    device-to-host copy. A packed forward makes one before pass 0 (`first_read`) and one after
    each gate (how many tokens go on, over how many sequences, at most how many in one)."""
    return torch.stack([x.reshape(()).long() for x in scalars]).to("cpu", copy=True).tolist()


def first_read(
    model: Any, input_ids: torch.Tensor, real_BT: torch.Tensor, exit_passes: torch.Tensor | None
) -> Rows:
    """The forward's first host read, one transfer: whether input_ids (and exit_passes) lie in
    range, and the sizes of the real positions (the packed strategy's pass 0)."""
    if not input_ids.numel():
        return Rows(0, 0, 0, 0, real_BT.sum(1), real_prefix=True)
    counts_B = real_BT.sum(1)
    ids_bad = ((input_ids < 0) | (input_ids >= model.config.vocab_size)).any()
    exit_bad = ids_bad.new_zeros(())
    if exit_passes is not None:
        exit_bad = ((exit_passes < 1) | (exit_passes > model.config.num_passes)).any()
    gap = (real_BT[:, 1:] & ~real_BT[:, :-1]).any()  # a real token after padding
    n, num_rows, width, span, bad_ids, bad_exits, gaps = read_host(
        counts_B.sum(),
        (counts_B > 0).sum(),
        counts_B.max(),
        _span(real_BT.reshape(-1), real_BT.shape[1]),
        ids_bad,
        exit_bad,
        gap,
    )
    if bad_ids:
        low, high = (int(x) for x in input_ids.aminmax())
        raise ValueError(
            f"input_ids must lie in [0, vocab_size={model.config.vocab_size}); got values in [{low}, {high}]"
        )
    if bad_exits:
        low, high = (int(x) for x in exit_passes.aminmax())
        raise ValueError(f"exit_passes must lie in [1, {model.config.num_passes}], got [{low}, {high}]")
    return Rows(n, num_rows, width, span, counts_B, real_prefix=not gaps)


def _span(keep_X: torch.Tensor, t: int, flat_X: torch.Tensor | None = None) -> torch.Tensor:
    """[] most chunk positions up to and including a sequence's last kept token (0: none kept);
    `flat_X` the chunk indices of `keep_X` (None: all B*T in order)."""
    if flat_X is None:
        flat_X = torch.arange(keep_X.numel(), device=keep_X.device)
    return (((flat_X % t) + 1) * keep_X).max() if keep_X.numel() else keep_X.new_zeros((), dtype=torch.long)


def selected_rows(keep_n: torch.Tensor, flat_n: torch.Tensor, b: int, t: int) -> Rows:
    """The rows `keep_n` selects among chunk positions `flat_n`, sizes read in one transfer."""
    counts_B = torch.zeros(b, dtype=torch.long, device=keep_n.device)
    counts_B.index_add_(0, flat_n // t, keep_n.long())
    n, num_rows, width, span = read_host(
        counts_B.sum(), (counts_B > 0).sum(), counts_B.max(), _span(keep_n, t, flat_n)
    )
    return Rows(n, num_rows, width, span, counts_B)


# --------------------------------------------------------------------------------------------------
# The loop, once for every strategy.


class Strategy(Protocol):
    """Which rows a pass computes and how it addresses K/V; `ponder_loop` does everything else.

    Names ending in _n are the n rows the current pass computes ([B, T], [n] or [B] per token)."""

    ids_n: torch.Tensor  # token ids of pass 0's rows
    exit_n: torch.Tensor | None  # the rows' fixed exits (fixed pruning); None: the gates decide
    positions: tuple[int, ...]  # shape of one pass's per-token outputs (activity, gates)
    device: torch.device
    goes_on: bool  # the next pass runs: some row is active in it (or every module must run)

    def run(self, pass_idx: int, e_nD: torch.Tensor) -> torch.Tensor:
        """h^i [n, D] of the pass's rows, every layer's K/V addressed as the strategy keeps them."""

    def record(self, pass_idx: int, h_nD: torch.Tensor) -> None:
        """h_out = where(m^i, h^i, h_out_prev), and m^i."""

    def gate_values(self, s_n: torch.Tensor) -> torch.Tensor:
        """s^i at every output position, 0 where it was not computed or the token had halted."""

    def go_on(
        self, keep_n: torch.Tensor, h_nD: torch.Tensor, e_nD: torch.Tensor, s_n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """m^{i+1} = m^i * keep: h^i, E^i and s^i of the rows the next update computes, with their
        m^{i+1} (None: they all go on). Sets `goes_on` (and `exit_n`); at most one host read."""

    def finish(self, gates: list[torch.Tensor] | None) -> Any:
        """The K/V of the passes not run (a token keeps its last run pass's), and the result."""


def confidence(model: Any, h: torch.Tensor) -> torch.Tensor:
    """max_v softmax(embed_out(h^i))_v [...] fp32: how sure pass i's own next-token prediction is
    (a training-free exit rule; the evaluation recomputes the head the mixture also runs)."""
    return torch.softmax(model.embed_out(h).float(), dim=-1).amax(-1)


def ponder_loop(
    model: Any,
    rows: Strategy,
    tau: float,
    num_run: int,
    want_gates: bool = True,
    exit_confidence: float | None = None,
    gate_scaling: bool = True,
) -> Any:
    """The rule of the module docstring, pass by pass, on the rows the strategy computes.

    Tokens halt when s^i < `tau`, at their fixed exit (`rows.exit_n`), or, with `exit_confidence`,
    once their pass's prediction puts at least that probability on one token; all stop after pass
    `num_run`. The two exits other than the gates apply to plain PonderLM too (evaluation
    baselines); `gate_scaling=False` drops s^i from the update (E^{i+1} = E^i + m^{i+1} e^i). The
    gates of updates not evaluated (the cap, nobody left) are 0. Returns `rows.finish`'s result."""
    cfg = model.config
    gates: list[torch.Tensor] | None = [] if want_gates and adaptive_gates(cfg) else None
    halts = cfg.adaptive or rows.exit_n is not None or exit_confidence is not None
    e_nD = first_input(model, rows.ids_n)  # E^0
    h_nD = s_n = live_n = None  # the update's inputs; s, m stay None in plain PonderLM
    for i in range(num_run):
        if not rows.goes_on:
            break  # nobody left: the remaining passes do not run (their K/V: rows.finish)
        if i > 0:  # E^i = E^{i-1} + m^i * s^{i-1} * e^{i-1}, for the rows that go on
            e_nD = next_input(e_nD, model.ponder_embedding(h_nD), s_n, live_n)
        h_nD = rows.run(i, e_nD)  # h^i, K, V = where(m^i, K_new, K_prev) as the strategy addresses them
        rows.record(i, h_nD)  # h_out = where(m^i, h^i, h_out_prev)
        if i == num_run - 1 or not halts:
            continue
        s_n = gate(model, i, h_nD) if cfg.adaptive else None  # s^i, fp32
        if gates is not None:
            gates.append(rows.gate_values(s_n))
        if exit_confidence is not None and rows.exit_n is None:
            keep_n = confidence(model, h_nD.detach()) < exit_confidence
        else:
            keep_n = continues(s_n, tau, i, rows.exit_n)  # 1[s^i >= tau]
        h_nD, e_nD, s_n, live_n = rows.go_on(keep_n, h_nD, e_nD, s_n)  # m^{i+1}; one host read
        if s_n is not None and not gate_scaling:
            s_n = torch.ones_like(s_n)
    if gates is not None:
        zeros = torch.zeros(rows.positions, dtype=torch.float32, device=rows.device)
        gates += [zeros] * (cfg.num_passes - 1 - len(gates))
    return rows.finish(gates)


def run_pass(model: Any, e_nD: torch.Tensor, kv: KVStore, pass_idx: int, lay: PassLayout) -> torch.Tensor:
    """Final-norm output h [n, D] of one pass over the tokens `lay` places, K/V through the store."""
    x_nD, new_kv = e_nD, []
    for layer, (k_prev, v_prev) in zip(model.gpt_neox.layers, kv.layer_kv(pass_idx)):
        # Positional tensors: activation checkpointing passes their gradients through.
        x_nD, k, v = layer(x_nD, None, None, None, k_prev, v_prev, layout=lay)
        new_kv.append((k, v))
    kv.update(pass_idx, new_kv)
    return model.gpt_neox.final_layer_norm(x_nD)


# --------------------------------------------------------------------------------------------------
# Every row: the definition.


class EveryRow:
    """Every token in every pass, [B, T]; `where` keeps a halted token's output, and its K/V in every
    layer (model.kv.aligned_where). No host read: the loop never stops early."""

    def __init__(
        self,
        model: Any,
        input_ids_BT: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        exit_passes_BT: torch.Tensor | None,
        halts: bool,
    ) -> None:
        self.model, self.cos, self.sin, self.mask, self.exit_n = model, cos, sin, mask, exit_passes_BT
        self.halts = halts  # some token may stop early: later passes keep halted tokens' K/V
        self.ids_n, self.positions, self.device = input_ids_BT, input_ids_BT.shape, input_ids_BT.device
        self.active_BT = torch.ones_like(input_ids_BT, dtype=torch.bool)  # m^0 = 1
        self.actives: list[torch.Tensor] = []
        self.kv_prev, self.h_out_BTD, self.goes_on = None, None, True

    def run(self, pass_idx: int, e_BTD: torch.Tensor) -> torch.Tensor:
        halting_BT = self.active_BT if pass_idx > 0 and self.halts else None
        h_BTD, self.kv_prev = self.model.gpt_neox.run_pass(
            e_BTD, self.cos, self.sin, self.mask, self.kv_prev, halting_BT
        )
        return h_BTD

    def record(self, pass_idx: int, h_BTD: torch.Tensor) -> None:
        if pass_idx > 0:  # a halted token keeps its output
            h_BTD = torch.where(self.active_BT[..., None], h_BTD, self.h_out_BTD)
        self.h_out_BTD = h_BTD
        self.actives.append(self.active_BT)

    def gate_values(self, s_BT: torch.Tensor) -> torch.Tensor:
        return torch.where(self.active_BT, s_BT, torch.zeros_like(s_BT))

    def go_on(self, keep_BT, h_BTD, e_BTD, s_BT):
        self.active_BT = self.active_BT & keep_BT
        return h_BTD, e_BTD, s_BT, self.active_BT

    def finish(self, gates: list[torch.Tensor] | None):
        """h_out [B, T, D], m^i of every pass [K, B, T] (0 in passes cut by the cap) and s^i of every
        update [K-1, B, T] (None when not adaptive)."""
        cut = self.model.config.num_passes - len(self.actives)
        active_KBT = torch.stack(self.actives + [torch.zeros_like(self.active_BT)] * cut)
        return self.h_out_BTD, active_KBT, None if gates is None else torch.stack(gates)


def ponder_every_row(
    model: Any,
    input_ids_BT: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    exit_passes_BT: torch.Tensor | None,
    tau: float,
    num_run: int,
    exit_confidence: float | None = None,
    gate_scaling: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The definition (`EveryRow.finish` returns); `mask` [B, 1, T, T] bool or None (causal)."""
    halts = model.config.adaptive or exit_passes_BT is not None or exit_confidence is not None
    rows = EveryRow(model, input_ids_BT, cos, sin, mask, exit_passes_BT, halts)
    return ponder_loop(model, rows, tau, num_run, True, exit_confidence, gate_scaling)


def padding_mask(attention_mask_BT: torch.Tensor | None, all_real: bool) -> torch.Tensor | None:
    """[B, 1, T, T] bool: causal, keys restricted to real tokens; None when nothing is padded.

    Every query may see itself, so a padding query at the left edge has a finite (unused) row.
    """
    if attention_mask_BT is None or all_real:
        return None
    t = attention_mask_BT.shape[-1]
    causal_TT = torch.ones(t, t, dtype=torch.bool, device=attention_mask_BT.device).tril()
    eye_TT = torch.eye(t, dtype=torch.bool, device=attention_mask_BT.device)
    return causal_TT & (attention_mask_BT.bool()[:, None, None, :] | eye_TT)


# --------------------------------------------------------------------------------------------------
# Packed: the active rows only.


@dataclass
class PonderResult:
    h_out: torch.Tensor  # [B, T, D] final outputs (last active pass's); 0 at padding positions
    active: torch.Tensor  # [K, B, T] bool, m^i; padding positions count as running pass 0 only
    gates: torch.Tensor | None  # [K-1, B, T] fp32 s^i, 0 where not computed; None if not adaptive


class PackedRows:
    """Pass i computes the active tokens (m^i = 1) of the whole batch as one [n, D] matrix; a halted
    token leaves it for good, its K/V carried forward in the store (`kv`). `flat_n`: the rows' chunk
    positions (indices into X = B*T), None while that is all of them; padding never runs."""

    def __init__(
        self,
        model: Any,
        input_ids_BT: torch.Tensor,
        real_BT: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVStore,
        past: int,
        real_BS: torch.Tensor,
        exit_passes_BT: torch.Tensor | None,
        uniform_calls: bool,
        pass0_h_BTD: torch.Tensor | None,
        real_rows: Rows | None,
    ) -> None:
        b, t = input_ids_BT.shape
        self.model, self.kv, self.b, self.t, self.uniform_calls = model, kv, b, t, uniform_calls
        self.pass0_h_BTD, self.positions, self.device = pass0_h_BTD, (b * t,), input_ids_BT.device
        real_X = real_BT.reshape(-1)
        self.rows = real_rows or selected_rows(real_X, torch.arange(b * t, device=self.device), b, t)
        self.n_real = self.rows.n
        chunk_all_real = self.n_real == b * t
        self.flat_n = None if chunk_all_real else torch.nonzero_static(real_X, size=self.n_real).squeeze(-1)
        ids_X = input_ids_BT.reshape(-1)
        self.ids_n = ids_X if self.flat_n is None else ids_X[self.flat_n]
        exit_X = exit_passes_BT.reshape(-1) if exit_passes_BT is not None else None
        self.exit_n = exit_X if exit_X is None or self.flat_n is None else exit_X[self.flat_n]
        # Every chunk position, while nobody has halted (no padding): the same layout in every pass.
        if self.flat_n is None:
            keys_all_real = real_BS is real_BT or bool(real_BS.all())
            self.full = full_layout(b, t, past, kv.in_place, cos, sin, real_BS, keys_all_real)
        # Queries at their own positions under plain causal attention (model.kv.packed_layout).
        causal = past == 0 and self.rows.real_prefix
        cos_XR, sin_XR = cos[:, 0].reshape(b * t, -1), sin[:, 0].reshape(b * t, -1)
        self.packed_args = (b, t, past, kv.in_place, cos_XR, sin_XR, real_BS, causal)
        # model.dtype is the embedding's, so E^0's and every pass's output's.
        self.h_out_XD = torch.zeros(b * t, model.config.hidden_size, dtype=model.dtype, device=self.device)
        self.active_KX = torch.zeros(model.config.num_passes, b * t, dtype=torch.bool, device=self.device)
        self.active_KX[0] = True  # padding counts as running pass 0 only
        # Without uniform_calls a pass with no active token is skipped, from pass 0 on.
        self.goes_on, self.passes_run = self.n_real > 0 or uniform_calls, 0

    def run(self, pass_idx: int, e_nD: torch.Tensor) -> torch.Tensor:
        if (self.b * self.t if self.flat_n is None else self.rows.n) < self.n_real:
            self.kv.carry_forward(pass_idx)  # the real tokens not in this pass keep their K/V in it
        if pass_idx == 0 and self.pass0_h_BTD is not None:  # a draft ran pass 0: its outputs h^0
            h_XD = self.pass0_h_BTD.reshape(self.b * self.t, -1)
            return h_XD if self.flat_n is None else h_XD[self.flat_n]
        lay = self.full if self.flat_n is None else packed_layout(self.flat_n, self.rows, *self.packed_args)
        return run_pass(self.model, e_nD, self.kv, pass_idx, lay)

    def record(self, pass_idx: int, h_nD: torch.Tensor) -> None:
        # Overwritten each pass: ends as the last active pass's output.
        if self.flat_n is None:
            self.h_out_XD = h_nD
            self.active_KX[pass_idx] = True
        else:
            self.h_out_XD = self.h_out_XD.index_put((self.flat_n,), h_nD)
            self.active_KX[pass_idx, self.flat_n] = True
        self.passes_run = pass_idx + 1

    def gate_values(self, s_n: torch.Tensor) -> torch.Tensor:
        return s_n if self.flat_n is None else s_n.new_zeros(self.b * self.t).index_put((self.flat_n,), s_n)

    def go_on(self, keep_n, h_nD, e_nD, s_n):
        """The halted rows leave the packed matrix: the rows left all go on. One host read (their sizes)."""
        flat_n = torch.arange(self.b * self.t, device=keep_n.device) if self.flat_n is None else self.flat_n
        self.rows = selected_rows(keep_n, flat_n, self.b, self.t)
        if self.rows.n < keep_n.numel():
            idx = torch.nonzero_static(keep_n, size=self.rows.n).squeeze(-1)
            h_nD, e_nD = h_nD[idx], e_nD[idx]
            s_n = None if s_n is None else s_n[idx]
            self.flat_n = idx if self.flat_n is None else self.flat_n[idx]
            self.exit_n = None if self.exit_n is None else self.exit_n[idx]
        self.goes_on = self.rows.n > 0 or self.uniform_calls
        return h_nD, e_nD, s_n, None

    def finish(self, gates: list[torch.Tensor] | None) -> PonderResult:
        if self.n_real:  # the passes not run (the cap, nobody left): every real token keeps its K/V
            for pass_idx in range(self.passes_run, self.model.config.num_passes):
                self.kv.carry_forward(pass_idx)
        b, t = self.b, self.t
        return PonderResult(
            h_out=self.h_out_XD.view(b, t, -1),
            active=self.active_KX.view(-1, b, t),
            gates=None if gates is None else torch.stack(gates).view(-1, b, t),
        )


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
    real_rows: Rows | None = None,
    exit_confidence: float | None = None,
    gate_scaling: bool = True,
) -> PonderResult:
    """The pondering loop on active tokens only.

    `model` is an AdaPonderForCausalLM. `cos`/`sin` [B, 1, T, R] are the chunk's rotary tables;
    `real_BS` flags the real positions of the store (the `past` cached ones, then the chunk's).
    Tokens halt when s^i < `tau` (or after `exit_passes_BT` passes: fixed pruning), and all stop
    after pass `num_run`. Without `uniform_calls` a pass with no active token is skipped.
    With `pass0_h_BTD` pass 0 already ran for this chunk (a self-speculative draft: its K/V are in
    the store, carried into every pass) and these are its outputs h^0: the loop goes on from them.
    `real_rows`: the real positions' sizes, if the caller read them already (else one read here).
    `exit_confidence`, `gate_scaling`: the evaluation baselines' exits (`ponder_loop`).
    """
    args = (real_BS, exit_passes_BT, uniform_calls, pass0_h_BTD, real_rows)
    rows = PackedRows(model, input_ids_BT, real_BT, cos, sin, kv, past, *args)
    return ponder_loop(model, rows, tau, num_run, True, exit_confidence, gate_scaling)


# --------------------------------------------------------------------------------------------------
# One token per sequence with a cache.


@dataclass
class DecodeResult:
    h_out: torch.Tensor  # [B, 1, D] last active pass's output
    passes: torch.Tensor | int  # [B] passes each row ran (int at batch 1)
    gates: list[torch.Tensor] | None  # per gate evaluated, s^i [B] (0 where halted before); if asked


def decode_applies(
    model: Any, cache: AdaPonderCache, chunk_len: int, all_real: bool, labels: Any, exit_passes: Any
) -> bool:
    """Whether a cached call (inference: no gradients either way) runs `decode_step`: one new token
    per sequence (`chunk_len` 1), all real (`all_real`, read on the host with the call's input
    check: generate() feeds real tokens only; the packed strategy handles padding), after a
    prefill, not every rank calling every module (a rank's step must not end at its own halt), no
    labels or fixed exit passes."""
    if chunk_len != 1 or not all_real or cache.get_seq_length() == 0 or labels is not None:
        return False
    return exit_passes is None and not model.every_rank_calls_every_module


class DecodeRows:
    """Every row of a small batch in every pass some row runs, in the fixed [B, 1] shape (a row more
    reads the same weights): no packing, no index tensor. K/V are written in place at the cache's new
    position; `where` keeps a halted row's output and K/V, as in the definition. At batch 1 the
    loop stops at the halt, so the one row is active in every pass that runs (no mask)."""

    def __init__(
        self,
        model: Any,
        input_ids_B1: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AdaPonderCache,
    ) -> None:
        b, device = input_ids_B1.shape[0], input_ids_B1.device
        self.model, self.cache = model, cache
        real_BS = cache.open_step(b, model.dtype, device)
        self.pos = real_BS.shape[1] - 1
        self.lay = full_layout(b, 1, self.pos, True, cos, sin, real_BS, cache.all_real)
        self.ids_n, self.exit_n, self.positions, self.device = input_ids_B1[:, 0], None, (b,), device
        self.active_B = None if b == 1 else torch.ones(b, dtype=torch.bool, device=device)
        self.passes_B = 0 if b == 1 else torch.zeros(b, dtype=torch.long, device=device)
        self.h_out_BD, self.passes_run, self.goes_on = None, 0, True

    def run(self, pass_idx: int, e_BD: torch.Tensor) -> torch.Tensor:
        h_BD = run_pass(self.model, e_BD, self.cache, pass_idx, self.lay)
        if pass_idx > 0 and self.active_B is not None:
            # Rows that halted before keep their last active pass's K/V in this pass too, every layer.
            kv, at = self.cache.kv, slice(self.pos, self.pos + 1)
            new = kv[pass_idx, ..., at, :]  # [L, 2, B, N, 1, H]
            new.copy_(torch.where(self.active_B[:, None, None, None], new, kv[pass_idx - 1, ..., at, :]))
        return h_BD

    def record(self, pass_idx: int, h_BD: torch.Tensor) -> None:
        if pass_idx > 0 and self.active_B is not None:  # a halted row keeps its output
            h_BD = torch.where(self.active_B[:, None], h_BD, self.h_out_BD)
        self.h_out_BD = h_BD
        self.passes_B = self.passes_B + (1 if self.active_B is None else self.active_B)
        self.passes_run = pass_idx + 1

    def gate_values(self, s_B: torch.Tensor) -> torch.Tensor:
        return s_B if self.active_B is None else s_B * self.active_B

    def go_on(self, keep_B, h_BD, e_BD, s_B):
        """The one host read per pass: whether any row goes on."""
        if self.active_B is not None:
            self.active_B = self.active_B & keep_B
        self.goes_on = bool(read_host(keep_B[0] if self.active_B is None else self.active_B.any())[0])
        return h_BD, e_BD, s_B, self.active_B

    def finish(self, gates: list[torch.Tensor] | None) -> DecodeResult:
        last = self.passes_run - 1
        if last < self.model.config.num_passes - 1:  # the position keeps its last pass's K/V in the rest
            self.cache.copy_pass(last, slice(last + 1, None), slice(self.pos, self.pos + 1))
        self.cache.record_step(self.passes_B)
        return DecodeResult(self.h_out_BD[:, None], self.passes_B, gates)


@torch.no_grad()
def decode_step(
    model: Any,
    input_ids_B1: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: AdaPonderCache,
    tau: float,
    num_run: int,
    want_gates: bool = False,
) -> DecodeResult:
    """Run one token per sequence through up to `num_run` passes, writing its K/V into `cache`;
    `cos`/`sin` [B, 1, 1, R] are the rotary tables of its positions.

    The cost of a small batch's step is reading the weights, so there is no packing, no index
    tensor and no statistics (`DecodeRows`)."""
    return ponder_loop(model, DecodeRows(model, input_ids_B1, cos, sin, cache), tau, num_run, want_gates)

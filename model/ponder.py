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

Three strategies execute it. They differ only in which rows a pass computes and how it addresses
K/V (model/kv.py):
  - every row (`ponder_every_row`, `dense=True`): every token runs every pass and `where` makes a
    halted token look frozen. It is the definition and the tests' oracle. It is never faster than
    the packed strategy, which with nobody halting runs the same full passes (BENCHMARKS.md,
    "Sparse vs dense training step"), so nothing takes it by default; it stays reachable
    (`ponder.sparse_training: false`) to check a run against the definition itself.
  - packed (`ponder_packed`): pass i gathers the active tokens (m^i = 1) of the whole batch into one
    [n, D] matrix; a halted token is never computed again, and later passes attend to its last
    active pass's K/V. Exact in the forward and in the gradients: nothing a halted token would
    compute later reaches the loss in the definition either. Training, evaluation and cached
    prefill; the K/V store decides where K/V live.
  - one token per sequence with a cache (`decode_step`): every row of a small batch runs every pass
    any row runs, in the fixed [B, 1] shape (a row more reads the same weights); `where` keeps a
    halted row's output and K/V, as in the definition. At batch 1 a halt ends the loop.

ZeRO-3: with `uniform_calls` (the model's `every_rank_calls_every_module`, which training/engine.py
turns on) every module of every pass runs even when this rank has no active token left (with a
[0, D] batch), so that all ranks gather the same parameters in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    """1[s^i >= tau] (hard, no gradient), or the fixed exit: more than pass_idx + 1 passes."""
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
# Every row: the definition.


def ponder_every_row(
    model: Any,
    input_ids_BT: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    exit_passes_BT: torch.Tensor | None,
    tau: float,
    num_run: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every token in every pass; `mask` [B, 1, T, T] bool or None (causal).

    Returns the frozen outputs h_out [B, T, D], the activity mask m^i of every pass [K, B, T]
    and the gate values s^i of every update [K-1, B, T] (0 for already-halted tokens; None
    when not adaptive).
    """
    cfg = model.config
    e_BTD = first_input(model, input_ids_BT)
    active_BT = torch.ones_like(input_ids_BT, dtype=torch.bool)  # m^0 = 1
    actives, gates = [active_BT], []
    kv_prev, h_out_BTD = None, None
    for i in range(num_run):
        h_BTD, kv_prev = model.gpt_neox.run_pass(
            e_BTD, cos, sin, mask, kv_prev, active_BT if i > 0 and cfg.adaptive else None
        )
        h_out_BTD = h_BTD if i == 0 else torch.where(active_BT[..., None], h_BTD, h_out_BTD)
        if i == num_run - 1:
            break
        e_ponder_BTD = model.ponder_embedding(h_BTD)
        if cfg.adaptive:
            s_BT = gate(model, i, h_BTD)
            gates.append(torch.where(active_BT, s_BT, torch.zeros_like(s_BT)))
            active_BT = active_BT & continues(s_BT, tau, i, exit_passes_BT)
            e_BTD = next_input(e_BTD, e_ponder_BTD, s_BT, active_BT)
        else:
            e_BTD = next_input(e_BTD, e_ponder_BTD, None)
        actives.append(active_BT)
    # Passes cut by the cap: nobody active, no gate evaluated.
    cut = cfg.num_passes - num_run
    actives += [torch.zeros_like(active_BT)] * cut
    gates += [torch.zeros_like(active_BT, dtype=torch.float32)] * (cut if cfg.adaptive else 0)
    return h_out_BTD, torch.stack(actives), torch.stack(gates) if gates else None


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
) -> PonderResult:
    """The pondering loop on active tokens only.

    `model` is an AdaPonderForCausalLM. `cos`/`sin` [B, 1, T, R] are the chunk's rotary tables;
    `real_BS` flags the real positions of the store (the `past` cached ones, then the chunk's).
    Tokens halt when s^i < `tau` (or after `exit_passes_BT` passes: fixed pruning), and all stop
    after pass `num_run`. Without `uniform_calls` a pass with no active token is skipped.
    With `pass0_h_BTD` pass 0 already ran for this chunk (a self-speculative draft: its K/V are in
    the store, carried into every pass) and these are its outputs h^0: the loop goes on from them.
    `real_rows`: the real positions' sizes, if the caller read them already (else one read here).
    """
    cfg = model.config
    b, t = input_ids_BT.shape
    device = input_ids_BT.device
    rows = real_rows or selected_rows(real_BT.reshape(-1), torch.arange(b * t, device=device), b, t)
    n_real = rows.n
    # Queries at their own positions under plain causal attention (model.kv.packed_layout).
    causal = past == 0 and rows.real_prefix
    chunk_all_real = n_real == b * t
    keys_all_real = chunk_all_real and (real_BS is real_BT or bool(real_BS.all()))
    cos_XR, sin_XR = cos[:, 0].reshape(b * t, -1), sin[:, 0].reshape(b * t, -1)
    ids_X = input_ids_BT.reshape(-1)
    exit_X = exit_passes_BT.reshape(-1) if exit_passes_BT is not None else None
    # Active chunk positions (indices into B*T), None while that is all of them; padding never runs.
    flat_n = None if chunk_all_real else torch.nonzero_static(real_BT.reshape(-1), size=n_real).squeeze(-1)
    e_nD = first_input(model, ids_X if flat_n is None else ids_X[flat_n])
    h_out_XD = e_nD.new_zeros(b * t, cfg.hidden_size)
    active_KX = torch.zeros(cfg.num_passes, b * t, dtype=torch.bool, device=device)
    active_KX[0] = True  # padding counts as running pass 0 only
    gates = []
    for i in range(cfg.num_passes):
        n = 0 if i >= num_run else b * t if flat_n is None else rows.n
        if i > 0 and n < n_real:
            kv.carry_forward(i)
        if i >= num_run or (n == 0 and not uniform_calls):
            continue  # nothing active: the pass is skipped (its K/V carried above)
        if flat_n is None:
            lay = full_layout(b, t, past, kv.in_place, cos, sin, real_BS, keys_all_real)
            active_KX[i] = True
        else:
            lay = packed_layout(flat_n, rows, b, t, past, kv.in_place, cos_XR, sin_XR, real_BS, causal)
            active_KX[i, flat_n] = True
        if i == 0 and pass0_h_BTD is not None:
            h_nD = pass0_h_BTD.reshape(b * t, -1)
            h_nD = h_nD if flat_n is None else h_nD[flat_n]
        else:
            h_nD = run_pass(model, e_nD, kv, i, lay)
        # Overwritten each pass: ends as the last active pass's output.
        h_out_XD = h_nD if flat_n is None else h_out_XD.index_put((flat_n,), h_nD)
        if i < num_run - 1:
            e_nD, flat_n, rows, gate_X = _ponder_step(model, i, h_nD, e_nD, flat_n, rows, b, t, tau, exit_X)
            gates.append(gate_X)
    has_gates = adaptive_gates(cfg)
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
    rows: Rows,
    b: int,
    t: int,
    tau: float,
    exit_X: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, Rows, torch.Tensor | None]:
    """Gate, halt and update on the packed rows: E^{i+1} of the tokens that go on to the next pass,
    their chunk indices (None: every chunk position), their sizes and s^i [X] (0 where not
    computed). Head + mixture run only for the tokens that go on. One host read (their sizes)."""
    if not model.config.adaptive:
        return next_input(e_nD, model.ponder_embedding(h_nD), None), flat_n, rows, None
    s_n = gate(model, pass_idx, h_nD)
    gate_X = s_n if flat_n is None else s_n.new_zeros(b * t).index_put((flat_n,), s_n)
    exit_n = None if exit_X is None else exit_X if flat_n is None else exit_X[flat_n]
    keep_n = continues(s_n, tau, pass_idx, exit_n)
    kept = selected_rows(
        keep_n, torch.arange(b * t, device=keep_n.device) if flat_n is None else flat_n, b, t
    )
    if kept.n < keep_n.numel():  # the halted rows leave the packed matrix: m^{i+1} = 1 for the rest
        idx = torch.nonzero_static(keep_n, size=kept.n).squeeze(-1)
        h_nD, e_nD, s_n = h_nD[idx], e_nD[idx], s_n[idx]
        flat_n = idx if flat_n is None else flat_n[idx]
    return next_input(e_nD, model.ponder_embedding(h_nD), s_n), flat_n, kept, gate_X


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
    tensor and no statistics: a pass runs while some row is active; a row that halted earlier is
    computed and discarded (`where`, its K/V restored from the previous pass). The position's
    entries of the passes that did not run are copied from the last one that did."""
    cfg = model.config
    b = input_ids_B1.shape[0]
    real_BS = cache.open_step(b, model.dtype, input_ids_B1.device)
    pos = real_BS.shape[1] - 1
    lay = full_layout(b, 1, pos, True, cos, sin, real_BS, cache.all_real)
    e_BD = first_input(model, input_ids_B1[:, 0])
    adaptive = adaptive_gates(cfg)
    # Batch 1: the loop stops at the halt, so the one row is active in every pass that runs.
    active_B = None if b == 1 else torch.ones(b, dtype=torch.bool, device=e_BD.device)
    passes_B = 0 if b == 1 else torch.zeros(b, dtype=torch.long, device=e_BD.device)
    gates: list[torch.Tensor] | None = [] if want_gates and adaptive else None
    h_out_BD, last = None, 0
    for i in range(num_run):
        h_BD = run_pass(model, e_BD, cache, i, lay)
        last = i
        if active_B is None:
            h_out_BD, passes_B = h_BD, passes_B + 1
        else:
            if i > 0:  # rows that halted before keep their last active pass's K/V in this pass too
                _restore_halted(cache, i, pos, active_B)
            h_out_BD = h_BD if i == 0 else torch.where(active_B[:, None], h_BD, h_out_BD)
            passes_B = passes_B + active_B
        if i == num_run - 1:
            break
        if not adaptive:
            e_BD = next_input(e_BD, model.ponder_embedding(h_BD), None)
            continue
        s_B = gate(model, i, h_BD)
        if gates is not None:
            gates.append(s_B if active_B is None else s_B * active_B)
        keep_B = continues(s_B, tau, i, None)
        if active_B is not None:
            active_B = active_B & keep_B
        # The one host read per pass: whether any row goes on.
        if not read_host(keep_B[0] if active_B is None else active_B.any())[0]:
            break
        e_BD = next_input(e_BD, model.ponder_embedding(h_BD), s_B, active_B)
    if last < cfg.num_passes - 1:  # passes not run: the position keeps its last pass's K/V
        cache.copy_pass(last, slice(last + 1, None), slice(pos, pos + 1))
    if gates is not None:
        zeros_B = torch.zeros(b, dtype=torch.float32, device=e_BD.device)
        gates += [zeros_B] * (cfg.num_passes - 1 - len(gates))
    cache.record_step(passes_B)
    return DecodeResult(h_out_BD[:, None], passes_B, gates)


def _restore_halted(cache: AdaPonderCache, pass_idx: int, pos: int, active_B: torch.Tensor) -> None:
    """Pass `pass_idx`'s K/V at `pos`, every layer: rows not active copy pass `pass_idx - 1`'s."""
    kv = cache.kv
    new = kv[pass_idx, ..., pos : pos + 1, :]  # [L, 2, B, N, 1, H]
    new.copy_(torch.where(active_B[:, None, None, None], new, kv[pass_idx - 1, ..., pos : pos + 1, :]))

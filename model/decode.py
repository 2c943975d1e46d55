"""The decode step: one new token per sequence, after a prefill, with the per-pass KV cache.

The general cached forward (model/sparse.py) packs each pass's active tokens, which costs host
syncs (how many are active, whether any is padding), index tensors and per-call statistics on every
call. A decode step of a small batch needs none of it: its cost is reading the weights (K backbones,
K heads, K - 1 mixtures over the embedding table), and a row more or less in a [B, D] x [D, D']
product reads the same weights. So here every row of the batch runs every pass that any row runs,
in the fixed [B, 1] shape:

- A pass runs while some row is still active. At batch 1 a halted token simply ends the loop (one
  data-dependent branch per pass, the gate value read on the host); at batch > 1 the loop ends when
  every row has halted, and a row that halted earlier is computed and discarded: its output and its
  K/V in the later passes are its last active pass's (`where`), as in the dense formulation.
- The K/V of the new position are written in place into the preallocated cache; the position's
  entries of the passes that did not run are copied from the last one that did (one copy for all
  layers and passes).
- No packing, no index tensors, no statistics: passes per token and FLOPs are computed only when
  asked (`output_halting`); the cache records each position's passes either way.

Same numbers as the general path: the same modules on the same rows, the attention over the same
keys (mask only where the cache holds padding), the same gate decisions, fp32 to rounding
(tests/test_decode_step.py).

`torch.compile`: the step's shapes are fixed except the attention's key length, which grows by one
per step; benchmarks/bench_decode_bound.py measures whether compiling the per-pass function pays on
CPU (BENCHMARKS.md, "Decode against the bandwidth bound").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from model.inference import AdaPonderCache
from model.sparse import full_layout, run_pass

# (model, e [B, D], cache, pass, layout) -> final-norm output h [B, D] of one pass (model.sparse)
PassFn = Callable[[Any, torch.Tensor, AdaPonderCache, int, Any], torch.Tensor]


@dataclass
class DecodeResult:
    h_out: torch.Tensor  # [B, 1, D] last active pass's output
    passes: torch.Tensor | int  # [B] passes each row ran (int at batch 1)
    gates: list[torch.Tensor] | None  # per gate evaluated, s^i [B] (0 where halted before); if asked


def applies_to(
    model: Any, cache: AdaPonderCache, real_BT: torch.Tensor, labels: Any, exit_passes: Any
) -> bool:
    """Whether a cached call (inference: no gradients either way) is a decode step this module
    runs: one real new token per sequence (`real_BT` [B, T]) after a prefill, weights not
    partitioned, no labels or fixed exit passes."""
    if real_BT.shape[1] != 1 or cache.get_seq_length() == 0 or labels is not None:
        return False
    if exit_passes is not None or hasattr(model.embed_out.weight, "ds_id"):
        return False
    # One host read of a [B] flag column: generate() feeds real tokens only (the general path handles
    # a padding token, which is never computed).
    return bool(real_BT.all())


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
    pass_fn: PassFn = run_pass,
) -> DecodeResult:
    """Run one token per sequence through up to `num_run` passes, writing its K/V into `cache`;
    `cos`/`sin` [B, 1, 1, R] are the rotary tables of its positions."""
    cfg = model.config
    b = input_ids_B1.shape[0]
    real_BS = cache.open_step(b, model.dtype, input_ids_B1.device)
    pos = real_BS.shape[1] - 1
    lay = full_layout(b, 1, pos, True, cos, sin, real_BS, cache.all_real)
    e_BD = model.gpt_neox.embed_in(input_ids_B1[:, 0]) * (cfg.embed_scale * cfg.base_mult)
    adaptive = cfg.adaptive and cfg.num_passes > 1
    # Batch 1: the loop stops at the halt, so the one row is active in every pass that runs.
    active_B = None if b == 1 else torch.ones(b, dtype=torch.bool, device=e_BD.device)
    passes_B = 0 if b == 1 else torch.zeros(b, dtype=torch.long, device=e_BD.device)
    gates: list[torch.Tensor] | None = [] if want_gates and adaptive else None
    h_out_BD, last = None, 0
    for i in range(num_run):
        h_BD = pass_fn(model, e_BD, cache, i, lay)
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
            e_BD = e_BD + model.ponder_embedding(h_BD)  # PonderLM: E^{i+1} = E^i + e^i
            continue
        s_B = model.ponder_gates[i](h_BD)  # s^i, fp32
        if gates is not None:
            gates.append(s_B if active_B is None else s_B * active_B)
        if active_B is None:
            if not float(s_B[0]) >= tau:  # the branch per pass: the token halts (as m^{i+1} = 1[s >= tau])
                break
            step_B1 = s_B[:, None].to(e_BD.dtype)
        else:
            active_B = active_B & (s_B >= tau)
            if not bool(active_B.any()):
                break
            step_B1 = (active_B * s_B)[:, None].to(e_BD.dtype)
        e_BD = e_BD + step_B1 * model.ponder_embedding(h_BD)  # E^{i+1} = E^i + m^{i+1} s^i e^i
    if last < cfg.num_passes - 1:  # passes not run: the position keeps its last pass's K/V
        cache.copy_pass(last, slice(last + 1, None), slice(pos, pos + 1))
    if gates is not None:
        zeros_B = torch.zeros(b, dtype=torch.float32, device=e_BD.device)
        gates += [zeros_B] * (cfg.num_passes - 1 - len(gates))
    cache.record_step(passes_B)
    return DecodeResult(h_out_BD[:, None], passes_B, gates)


def compiled_pass(**compile_kwargs: Any) -> PassFn:
    """A pass function (model.sparse.run_pass) whose layers run through `torch.compile`: one graph
    for every layer and pass (parameters are graph inputs), the key length dynamic. Outputs agree
    with the eager pass to float rounding (fused elementwise ops), not bitwise."""
    layer_fn = torch.compile(_layer_output, dynamic=True, **compile_kwargs)

    def pass_fn(
        model: Any, e_BD: torch.Tensor, cache: AdaPonderCache, pass_idx: int, lay: Any
    ) -> torch.Tensor:
        x_BD = e_BD
        for layer, (k_store, v_store) in zip(model.gpt_neox.layers, cache.layer_kv(pass_idx)):
            x_BD = layer_fn(layer, x_BD, k_store, v_store, lay)
        return model.gpt_neox.final_layer_norm(x_BD)

    return pass_fn


def _layer_output(layer: Any, x_BD: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, lay: Any):
    return layer(x_BD, None, None, None, k_store, v_store, layout=lay)[0]


def _restore_halted(cache: AdaPonderCache, pass_idx: int, pos: int, active_B: torch.Tensor) -> None:
    """Pass `pass_idx`'s K/V at `pos`, every layer: rows not active copy pass `pass_idx - 1`'s."""
    kv = cache.kv
    new = kv[pass_idx, ..., pos : pos + 1, :]  # [L, 2, B, N, 1, H]
    new.copy_(torch.where(active_B[:, None, None, None], new, kv[pass_idx - 1, ..., pos : pos + 1, :]))

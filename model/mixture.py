"""The pondering mixture e = softmax(h W_out^T) @ W_in, chunked over tokens forward and backward.

No [n, V] logits or probabilities exist beyond one chunk's, with or without activation
checkpointing. Softmax statistics, the row sums of the softmax backward and the weight-gradient
accumulators are fp32; every vocabulary-sized product (forward: logits, mixture; backward: the
recomputed logits, dP, dh and the weight gradients dW_out, dW_in) runs in the weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bytes of one chunk's fp32 [tokens, V] logits in the pondering mixture: 166 tokens at Pythia's vocabulary.
MIXTURE_CHUNK_BYTES = 2**25


class ChunkedMixture(torch.autograd.Function):
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
            if need_in:
                _accumulate(dw_in, p_cV.to(de_cD.dtype).T, de_cD)
            dp_cV = (de_cD @ w_in_VD.T).float()
            # In place, with the row sums as a batched dot product: two [c, V] buffers in all.
            dp_cV -= torch.bmm(p_cV[:, None, :], dp_cV[:, :, None])[:, 0]
            dlogits_cV = dp_cV.mul_(p_cV).to(h_nD.dtype)
            if need_h:
                dh_nD[rows] = dlogits_cV @ w_out_VD
            if need_out:
                _accumulate(dw_out, dlogits_cV.T, h_cD)
        return (
            dh_nD,
            dw_out.to(w_out_VD.dtype) if need_out else None,
            dw_in.to(w_in_VD.dtype) if need_in else None,
            None,
        )


def _accumulate(acc_VD: torch.Tensor, a_Vc: torch.Tensor, b_cD: torch.Tensor) -> None:
    """acc += a @ b: the vocabulary-sized product in the weights' dtype (bf16 in a bf16 run, where
    the FLOPs are), the sum across chunks in the fp32 accumulator; fp32 runs add in place (addmm_:
    no [V, D] temporary per chunk)."""
    if a_Vc.dtype == acc_VD.dtype:
        acc_VD.addmm_(a_Vc, b_cD)
    else:
        acc_VD += a_Vc @ b_cD


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

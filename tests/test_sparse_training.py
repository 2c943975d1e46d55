"""The sparse training step (model.ponder.ponder_packed, `dense=False`) equals the dense one: loss, logits and
every parameter's gradient (fp32, 1e-5), while tokens halt after every pass."""

import pytest
import torch
from helpers import VOCAB, left_padded_batch, random_halting_model


def training_step(model, ids, mask, dense, **kwargs):
    model.zero_grad(set_to_none=True)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    out = model(
        ids, attention_mask=mask, labels=labels, ponder_lambda=0.3, ponder_k=0.25, dense=dense, **kwargs
    )
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same_step(model, ids, mask=None, **kwargs):
    dense, dense_grads = training_step(model, ids, mask, True, **kwargs)
    sparse, sparse_grads = training_step(model, ids, mask, False, **kwargs)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert torch.equal(sparse.passes[real], dense.passes[real])
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.ponder_loss, dense.ponder_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.logits[real], dense.logits[real], atol=1e-5, rtol=1e-5)
    assert sparse_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        if grad is None:  # a gate after the max_passes cap is never evaluated
            assert sparse_grads[name] is None, name
        else:
            torch.testing.assert_close(sparse_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    return dense


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sparse_step_equals_dense_step_with_tokens_halting_after_every_pass(checkpointing, padded):
    model = random_halting_model(seed=21).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    if padded:
        ids, mask, _ = left_padded_batch([16, 11, 6], 16, seed=2)
        mask[0, 12:] = 0  # right padding too
    else:
        ids, mask = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2)), None
    dense = assert_same_step(model, ids, mask)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert set(dense.passes[real].tolist()) == {1, 2, 3, 4}, "tokens must halt after every pass"


def test_sparse_step_with_exit_passes_and_the_compute_knob():
    model = random_halting_model(seed=22).train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    exits = torch.randint(1, 5, ids.shape, generator=torch.Generator().manual_seed(4))
    exits[1] = 1  # one sequence stops after pass 1 everywhere
    dense = assert_same_step(model, ids, exit_passes=exits)
    assert torch.equal(dense.passes, exits)
    assert_same_step(model, ids, max_passes=3, halt_threshold=0.4)


def test_sparse_step_when_every_token_halts_after_the_first_pass_and_gates_only_learn():
    model = random_halting_model(seed=23).train()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    dense = assert_same_step(model, ids, exit_passes=torch.ones_like(ids))
    assert (dense.passes == 1).all()
    for name, param in model.named_parameters():  # the gates-only phase freezes the backbone
        param.requires_grad_(name.startswith("ponder_gates."))
    assert_same_step(model, ids)


@pytest.mark.parametrize("overrides", [dict(adaptive=False), dict(ponder_topk=5), dict(num_passes=1)])
def test_sparse_step_without_halting_top_k_and_one_pass(overrides):
    model = random_halting_model(seed=24, **overrides).train()
    ids, mask, _ = left_padded_batch([9, 5], 9, seed=6)
    assert_same_step(model, ids, mask)

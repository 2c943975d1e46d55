"""The pondering mixture softmax(h W_out^T) @ W_in in chunks, forward and backward, against the
plain autograd formula, and the absence of vocabulary-sized activations."""

import pytest
import torch
from helpers import VOCAB, random_halting_model

import model.mixture as mixture
import model.modeling as modeling


def reference_mixture(h, w_out, w_in, topk):
    logits = (h @ w_out.T).float()
    if topk:
        vals, idx = logits.topk(topk, dim=-1)
        return (vals.softmax(-1)[..., None] * w_in[idx]).sum(-2)
    return logits.softmax(-1) @ w_in


@pytest.mark.parametrize("topk", [0, 7])
def test_chunked_mixture_equals_the_autograd_formula_forward_and_backward(monkeypatch, topk):
    monkeypatch.setattr(mixture, "MIXTURE_CHUNK_BYTES", 3 * 4 * VOCAB)  # chunks of 3 tokens
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 32, generator=generator, requires_grad=True)
    w_out = torch.randn(VOCAB, 32, generator=generator, requires_grad=True)
    w_in = torch.randn(VOCAB, 32, generator=generator, requires_grad=True)
    de = torch.randn(2, 5, 32, generator=generator)
    head = modeling.PonderHead(32, VOCAB, bias=False)
    head.weight = torch.nn.Parameter(w_out.detach().clone())
    table = w_in.detach().clone().requires_grad_()
    h2 = h.detach().clone().requires_grad_()
    chunked = head(h2, table, topk)
    expected = reference_mixture(h, w_out, w_in, topk)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)
    (chunked * de).sum().backward()
    (expected * de).sum().backward()
    torch.testing.assert_close(h2.grad, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, w_out.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table.grad, w_in.grad, atol=1e-5, rtol=1e-5)
    assert head(h2[:, :0], table, topk).shape == (2, 0, 32)  # a rank with no active token


def vocabulary_sized_saved(model, ids, vocab):
    """Shapes of the saved activations of a training step with a vocabulary-sized dimension."""
    params = {p.data_ptr() for p in model.parameters()}
    shapes = []

    def pack(tensor):
        if tensor.data_ptr() not in params and vocab in tensor.shape:
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.2).loss.backward()
    return shapes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_vocabulary_sized_activation_in_the_pondering_mixture(checkpointing):
    vocab = 512
    ids = torch.randint(0, vocab, (2, 12))
    saved = {}
    for passes in (1, 4):
        model = random_halting_model(seed=16, vocab_size=vocab, num_passes=passes).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        saved[passes] = vocabulary_sized_saved(model, ids, vocab)
    # Only the final head and its cross-entropy keep [B, T, V] tensors, as in a one-pass model.
    assert saved[4] == saved[1]
    assert saved[1], "the final head's logits are expected to be saved"

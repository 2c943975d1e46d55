"""Fused-attention friendly: a packed training step and an evaluation forward in which about half the
tokens halt create no tensor that grows as T^2 per sequence (a mask or attention weights), so the
GPU's flash and memory-efficient kernels apply. Every tensor an op produces, forward and backward, is
inspected through TorchDispatchMode on CPU."""

import torch
from helpers import VOCAB, random_halting_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# T/8 exceeds the vocabulary (96) and every width, so a tensor with last two dimensions of at least
# (T/8, T) has both on the scale of the sequence: a mask or attention weights.
T = 1024


class QuadraticTensors(TorchDispatchMode):
    """Records the ops whose output has last two dimensions of at least (T/8, T)."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.t = t
        self.found: list[tuple[str, tuple[int, ...]]] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        self.ops.add(name)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2:
                rows, cols = leaf.shape[-2:]
                if rows >= self.t // 8 and cols >= self.t:
                    self.found.append((name, tuple(leaf.shape)))
        return out


def model_and_batch(seed: int):
    model = random_halting_model(seed=seed, max_position_embeddings=T)
    ids = torch.randint(1, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))
    return model, ids


def halting_spread(out) -> float:
    """The share of real tokens that stopped before the last pass."""
    return float((out.passes < 4).float().mean())


def test_a_packed_training_step_builds_no_quadratic_tensor():
    model, ids = model_and_batch(seed=3)
    model.train()
    with QuadraticTensors(T) as seen:
        out = model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.1, dense=False)
        out.loss.backward()
    assert 0.3 < halting_spread(out) < 0.9, "about half the tokens must halt early"
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in seen.ops  # the fused backward ran
    assert seen.found == []


def test_an_eval_forward_builds_no_quadratic_tensor_with_or_without_right_padding():
    model, ids = model_and_batch(seed=4)
    model.eval()
    mask = torch.ones_like(ids)
    mask[1, T // 2 :] = 0  # lm-eval pads on the right
    for attention_mask in (None, mask):
        with torch.no_grad(), QuadraticTensors(T) as seen:
            out = model(ids, attention_mask=attention_mask)
        assert 0.3 < halting_spread(out) < 0.9
        assert "_scaled_dot_product_flash_attention_for_cpu" in seen.ops
        assert seen.found == []


def test_the_causal_grid_equals_every_row_under_right_padding():
    """The packed forward's causal query grid (queries at their own positions, no mask) gives the
    definition's logits on the real tokens of a right-padded batch."""
    model, ids = model_and_batch(seed=5)
    model.eval()
    mask = torch.ones_like(ids)
    mask[0, 700:] = 0
    mask[1, 9:] = 0
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, dense=False)
        every_row = model(ids, attention_mask=mask, dense=True)
    real = mask.bool()
    torch.testing.assert_close(packed.logits[real], every_row.logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.passes[real], every_row.passes[real])

"""Half precision where the FLOPs are: in a bf16 training step of the pythia-70m widths, the matrix
products run in bf16 (counted by dtype through TorchDispatchMode), and the halting decisions stay
those of the fp32 gates."""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from model import AdaPonderConfig, AdaPonderForCausalLM
from model.mixture import ChunkedMixture

_CPU_ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu": 1,  # 2 products of [T, S] x H: 4 B N T S H
    "_scaled_dot_product_flash_attention_for_cpu_backward": 2,
}


class MatmulFlopsByDtype(TorchDispatchMode):
    """Matrix-product FLOPs of every op that torch's flop counter knows, in place or not (plus CPU
    flash attention), keyed by the dtype of the op's first tensor input."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet.__name__.endswith("_") and hasattr(torch.ops.aten, packet.__name__[:-1]):
            packet = getattr(torch.ops.aten, packet.__name__[:-1])  # addmm_ counts as addmm
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None:
            return out
        if packet in flop_registry:
            self.flops[first.dtype] += flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet.__name__ in _CPU_ATTENTION:
            q = args[1] if packet.__name__.endswith("backward") else args[0]
            k = args[2] if packet.__name__.endswith("backward") else args[1]
            b, n, t, h = q.shape
            self.flops[first.dtype] += 4 * b * n * t * k.shape[2] * h * _CPU_ATTENTION[packet.__name__]
        return out


def pythia_70m_widths(**overrides) -> AdaPonderConfig:
    """pythia-70m's widths and vocabulary, two layers, random gates around tau = 0.5."""
    fields = dict(
        vocab_size=50304,
        hidden_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        intermediate_size=2048,
        halt_threshold=0.5,
    )
    return AdaPonderConfig(**{**fields, **overrides})


def halting_model(dtype: torch.dtype, seed: int = 0) -> AdaPonderForCausalLM:
    torch.manual_seed(seed)
    model = AdaPonderForCausalLM(pythia_70m_widths())
    with torch.no_grad():
        for gate in model.ponder_gates:
            gate.dense_out.weight.normal_(0.0, 0.05)
            gate.dense_out.bias.fill_(0.3)
    return model.to(dtype)


def test_a_bf16_training_step_runs_its_matrix_products_in_bf16():
    model = halting_model(torch.bfloat16).train()
    ids = torch.randint(0, 50304, (1, 16), generator=torch.Generator().manual_seed(1))
    with MatmulFlopsByDtype() as counter:
        out = model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.1, dense=False)
        out.loss.backward()
    assert 1.0 < float(out.mean_passes) < 4.0, "tokens must halt, and not all after pass 1"
    assert out.gates.dtype == torch.float32 and out.loss.dtype == torch.float32
    total = sum(counter.flops.values())
    share = counter.flops[torch.bfloat16] / total
    assert share >= 0.98, f"bf16 share of matmul FLOPs {share:.4f}: {dict(counter.flops)}"


def test_the_mixture_backward_in_bf16_stays_close_to_fp32():
    """The weight gradients' products in bf16, summed over chunks in fp32: within bf16 rounding of
    the fp32 gradients (relative to their scale), for several chunks."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(40, 32, generator=generator)
    w_out, w_in = torch.randn(96, 32, generator=generator), torch.randn(96, 32, generator=generator)
    de = torch.randn(40, 32, generator=generator)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.nn.Parameter(w_out.to(dtype))
        table = torch.nn.Parameter(w_in.to(dtype))
        h_in = h.to(dtype, copy=True).requires_grad_()
        (ChunkedMixture.apply(h_in, head, table, 0).float() * de).sum().backward()
        grads[dtype] = [h_in.grad.float(), head.grad.float(), table.grad.float()]
        assert head.grad.dtype == dtype and table.grad.dtype == dtype
    for full, half in zip(grads[torch.float32], grads[torch.bfloat16]):
        assert (full - half).abs().max() <= 0.03 * full.abs().max()

"""What CPU/gloo runs cannot show about GPU/NCCL runs: collectives on the accelerator's device."""

import pytest
import torch
import torch.distributed as torch_dist
from helpers import tiny

from model import AdaPonderForCausalLM
from training import engine as ds

COLLECTIVES = (
    "broadcast",
    "all_reduce",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@pytest.fixture
def nccl_like(monkeypatch, tmp_path):
    """One gloo rank whose collectives behave like NCCL's: a tensor not on the engine's device is
    refused. On CPU the host and the "accelerator" would be the same device, so the engine's device
    is made `meta` here: every tensor still on the host is told apart, and a collective over meta
    tensors (no data) is checked and skipped. Returns the list of collectives called."""
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    accelerator = torch.device("meta")
    monkeypatch.setattr(ds, "device", lambda: accelerator)
    called = []

    def checked(name):
        def collective(*args, **kwargs):
            for tensor in _tensors([*args, *kwargs.values()]):
                if tensor.device != accelerator:
                    raise RuntimeError(f"{name}: tensor on {tensor.device}, not the engine's {accelerator}")
            called.append(name)

        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(torch_dist, name, checked(name))
    yield called
    monkeypatch.undo()
    torch_dist.destroy_process_group()


def test_the_wrapper_refuses_host_tensors(nccl_like):
    with pytest.raises(RuntimeError, match="not the engine's meta"):
        torch_dist.broadcast(torch.zeros(2), src=0)


def test_write_weights_broadcasts_on_the_device_zero12(nccl_like):
    """ZeRO-1/2 (unpartitioned model, built on the host): init_from and a rank-count change write
    rank 0's weights and broadcast them to every rank, which NCCL accepts on the device only."""
    model = AdaPonderForCausalLM(tiny())
    state = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    ds.write_weights(model, state)
    assert nccl_like.count("broadcast") == len(state)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_pass_where_every_token_halted_hands_sdpa_no_empty_batch(monkeypatch):
    """Training runs every pass on every rank (ZeRO-3), also with no active token left; fused
    attention kernels reject an empty batch, so SDPA must not see one."""
    from helpers import VOCAB, random_halting_model

    import model.kv as sparse

    real_sdpa = sparse.F.scaled_dot_product_attention
    calls = []

    def fused_only(q, k, v, **kwargs):
        if 0 in (q.shape[0], k.shape[0]):
            raise RuntimeError(f"empty batch: q {tuple(q.shape)}")
        calls.append(q.shape[0])
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(sparse.F, "scaled_dot_product_attention", fused_only)
    model = random_halting_model(seed=23).train()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    out = model(ids, labels=ids, dense=False, exit_passes=torch.ones_like(ids))
    out.loss.backward()
    assert (out.passes == 1).all() and calls  # pass 1 ran through SDPA, passes 2-4 had no token
    weight = model.gpt_neox.layers[0].attention.query_key_value.weight
    assert weight.grad is not None and torch.isfinite(weight.grad).all()

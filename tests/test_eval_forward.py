"""The evaluation forward: eval mode skips halted tokens by default, and the compute knob
(halt_threshold, max_passes) set at load or call time."""

import gc
import weakref

import pytest
import torch
from helpers import left_padded_batch, random_halting_model

import model.modeling as modeling
from model import AdaPonderForCausalLM
from model.inference import AdaPonderCache
from model.kv import AlignedKV


@pytest.fixture
def sparse_calls(monkeypatch):
    """Counts calls of the sparse pondering loop, recording the K/V store each ran with."""
    calls = []
    original = modeling.ponder_packed

    def counting(*args, **kwargs):
        calls.append(args[5])  # the K/V store
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "ponder_packed", counting)
    return calls


def test_eval_mode_skips_halted_tokens_by_default_with_the_dense_numbers(sparse_calls):
    model = random_halting_model(seed=11).eval()
    ids, mask, positions = left_padded_batch([16, 12, 7], 16, seed=4)
    real = mask.bool()
    with torch.no_grad():
        dense = model(ids, attention_mask=mask, position_ids=positions, dense=True)
        assert not sparse_calls
        default = model(ids, attention_mask=mask, position_ids=positions)
    assert len(sparse_calls) == 1 and isinstance(sparse_calls[0], AlignedKV), "no cache asked for"
    assert default.cache is None
    assert set(dense.passes[real].tolist()) == {1, 2, 3, 4}, "tokens must halt after every pass"
    assert torch.equal(default.passes[real], dense.passes[real])
    torch.testing.assert_close(default.logits[real], dense.logits[real], atol=1e-5, rtol=1e-5)
    assert float(default.flops["total"]) < float(default.flops["dense_total"])


def test_both_modes_skip_halted_tokens_by_default_with_the_definitions_gradients(sparse_calls):
    model = random_halting_model(seed=12)
    ids = torch.randint(1, 90, (2, 8))
    out = model(ids)  # training mode: packed unless dense=True (ponder.sparse_training: false)
    assert len(sparse_calls) == 1 and out.logits.requires_grad
    out.logits.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, dense=True).logits.sum().backward()
    assert len(sparse_calls) == 1  # dense=True runs the definition
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-5, msg=name)
    model.eval()
    out = model(ids)  # eval mode recording gradients: packed, with gradients
    assert len(sparse_calls) == 2 and out.logits.requires_grad
    random_halting_model(seed=12, adaptive=False).eval()(ids)  # plain PonderLM: packed, nobody halts
    assert len(sparse_calls) == 3


def test_eval_forward_without_cache_holds_two_passes_of_keys_and_values(monkeypatch):
    model = random_halting_model(seed=13).eval()
    ids = torch.randint(1, 90, (2, 10))
    passes = []  # weak references to each pass's first-layer keys, and whether older ones were alive
    original = AlignedKV.update

    def update(self, pass_idx, kv):
        passes.append(weakref.ref(kv[0][0]))
        original(self, pass_idx, kv)
        gc.collect()
        assert all(ref() is None for ref in passes[:-2]), "only two passes' K/V may be alive"

    monkeypatch.setattr(AlignedKV, "update", update)
    with torch.no_grad():
        uncached = model(ids, halt_threshold=0.0)  # nobody halts: every pass runs
        cached = model(ids, cache=AdaPonderCache(model.config))
    assert len(passes) == model.config.num_passes
    assert uncached.cache is None
    torch.testing.assert_close(uncached.logits, model(ids, dense=True, halt_threshold=0.0).logits)
    torch.testing.assert_close(cached.logits, model(ids, dense=True).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense", [True, False])
def test_halt_threshold_override_changes_halting_and_defaults_to_the_trained_value(dense):
    model = random_halting_model(seed=14).eval()
    ids, mask, positions = left_padded_batch([16, 10], 16, seed=5)
    real = mask.bool()
    run = lambda **kw: model(ids, attention_mask=mask, position_ids=positions, dense=dense, **kw)  # noqa: E731
    with torch.no_grad():
        default = run()
        explicit = run(halt_threshold=model.config.halt_threshold)
        lower, higher = run(halt_threshold=0.2), run(halt_threshold=0.8)
    assert torch.equal(default.passes, explicit.passes)
    torch.testing.assert_close(default.logits, explicit.logits, atol=0, rtol=0)
    # A higher tau halts more: per token, never more passes; overall strictly fewer here.
    assert (higher.passes[real] <= default.passes[real]).all()
    assert (default.passes[real] <= lower.passes[real]).all()
    assert float(higher.mean_passes) < float(default.mean_passes) < float(lower.mean_passes)
    # The override is the same model as one whose config carries that tau.
    model.config.halt_threshold = 0.8
    with torch.no_grad():
        reconfigured = run()
    assert torch.equal(reconfigured.passes, higher.passes)
    torch.testing.assert_close(reconfigured.logits[real], higher.logits[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_max_passes_caps_every_token_and_matches_fixed_exits(cap):
    model = random_halting_model(seed=15).eval()
    ids, mask, positions = left_padded_batch([16, 13], 16, seed=6)
    real = mask.bool()
    with torch.no_grad():
        free = model(ids, attention_mask=mask, position_ids=positions, dense=True)
        capped_sparse = model(ids, attention_mask=mask, position_ids=positions, max_passes=cap)
        capped_dense = model(ids, attention_mask=mask, position_ids=positions, max_passes=cap, dense=True)
        # The gates decide as before below the cap; everyone still active stops at it.
        expected_passes = free.passes.clamp(max=cap)
        fixed = model(
            ids, attention_mask=mask, position_ids=positions, exit_passes=expected_passes, dense=True
        )
    for capped in (capped_sparse, capped_dense):
        assert torch.equal(capped.passes[real], expected_passes[real])
        torch.testing.assert_close(capped.logits[real], fixed.logits[real], atol=1e-5, rtol=1e-5)
        assert capped.halted_fraction[cap:].sum() == 0
    with pytest.raises(ValueError, match="max_passes"):
        model(ids, max_passes=5)


def test_compute_knob_at_load_time_and_in_generate(tmp_path):
    model = random_halting_model(seed=16).eval()
    model.save_pretrained(tmp_path)
    loaded = AdaPonderForCausalLM.from_pretrained(tmp_path, halt_threshold=0.8, max_passes=3).eval()
    assert loaded.config.halt_threshold == 0.8 and loaded.config.max_passes == 3
    ids = torch.randint(1, 90, (2, 12))
    with torch.no_grad():
        via_load = loaded(ids)
        via_call = model(ids, halt_threshold=0.8, max_passes=3)
    assert torch.equal(via_load.passes, via_call.passes)
    torch.testing.assert_close(via_load.logits, via_call.logits, atol=1e-6, rtol=1e-6)

    prompt = torch.randint(1, 90, (1, 6))
    caches = {}
    for tau in (0.2, 0.8):
        caches[tau] = AdaPonderCache(model.config)
        model.generate(prompt, max_new_tokens=8, do_sample=False, cache=caches[tau], halt_threshold=tau)
    low, high = (caches[tau].passes.float().mean() for tau in (0.2, 0.8))
    assert high < low, "a higher tau passed to generate() must halt more"

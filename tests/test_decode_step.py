"""The fixed-shape decode step (model.ponder.decode_step) against the general cached forward and the
dense one."""

import pytest
import torch
from helpers import VOCAB, left_padded_batch, random_halting_model
from torch.utils._python_dispatch import TorchDispatchMode

import model.ponder as ponder
from model.accounting import decode_bytes
from model.inference import AdaPonderCache

# name -> (model overrides, tau): random gates around tau = 0.5 halt tokens after every pass; tau = 0
# halts nobody (f = 0).
CASES = {
    "K4-halting": (dict(), 0.5),
    "K4-no-halting": (dict(), 0.0),
    "K4-sequential-residual": (dict(use_parallel_residual=False), 0.5),
    "ponderlm": (dict(adaptive=False), 0.5),
    "K1": (dict(num_passes=1), 0.5),
}


def decode_both_ways(model, ids, mask, positions, prefill, **kwargs):
    """Per path (general, fast): the outputs of each decode step and the cache after them."""
    results = {}
    for fast in (False, True):
        cache = AdaPonderCache(model.config, max_length=ids.shape[1])
        model(
            ids[:, :prefill],
            attention_mask=mask[:, :prefill],
            position_ids=positions[:, :prefill],
            cache=cache,
        )
        outs = [
            model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=positions[:, t : t + 1],
                cache=cache,
                fast_decode=fast,
                **kwargs,
            )
            for t in range(prefill, ids.shape[1])
        ]
        results[fast] = (outs, cache)
    return results


@pytest.mark.parametrize("batch", [[16], [16, 10, 6]], ids=["batch1", "left-padded-batch3"])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_step_equals_the_general_cached_path(name, batch):
    overrides, tau = CASES[name]
    model = random_halting_model(seed=22, **overrides).eval()
    ids, mask, positions = left_padded_batch(batch, 16, seed=3)
    results = decode_both_ways(model, ids, mask, positions, prefill=4, halt_threshold=tau)
    (general, general_cache), (fast, fast_cache) = results[False], results[True]
    for g, f in zip(general, fast):
        torch.testing.assert_close(f.logits, g.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(f.passes, g.passes)
        torch.testing.assert_close(f.mean_passes, g.mean_passes)
        torch.testing.assert_close(f.halted_fraction, g.halted_fraction)
        for part in g.flops:
            torch.testing.assert_close(f.flops[part], g.flops[part])
        if g.gates is None:
            assert f.gates is None
        else:
            torch.testing.assert_close(f.gates, g.gates, atol=1e-6, rtol=1e-6)
    # The cache after the fast steps: every pass's K/V (halted tokens' copies included), flags, passes.
    assert fast_cache.get_seq_length() == general_cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(fast_cache.kv, general_cache.kv, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast_cache.passes, general_cache.passes)
    assert torch.equal(fast_cache.real, general_cache.real)
    passes = torch.cat([g.passes for g in general], 1)[mask[:, 4:].bool()]  # real positions
    if name == "K4-halting":
        assert set(passes.tolist()) == {1, 2, 3, 4}, "every exit pass must occur"
    elif name in ("K4-no-halting", "ponderlm"):
        assert (passes == model.config.num_passes).all()


def test_decode_step_with_a_pass_cap_and_without_statistics():
    model = random_halting_model(seed=22).eval()
    ids, mask, positions = left_padded_batch([10, 7], 10, seed=4)
    capped = decode_both_ways(model, ids, mask, positions, prefill=5, max_passes=2)
    for g, f in zip(capped[False][0], capped[True][0]):
        torch.testing.assert_close(f.logits, g.logits, atol=1e-5, rtol=1e-5)
    assert capped[True][1].passes[:, 5:].max() == 2
    torch.testing.assert_close(capped[True][1].kv, capped[False][1].kv, atol=1e-5, rtol=1e-5)
    quiet = decode_both_ways(model, ids, mask, positions, prefill=5, output_halting=False)
    for g, f in zip(quiet[False][0], quiet[True][0]):
        assert f.passes is None and f.flops is None and f.gates is None
        torch.testing.assert_close(f.logits, g.logits, atol=1e-5, rtol=1e-5)


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_generate_takes_the_decode_step_and_gives_the_general_paths_tokens(monkeypatch, tau):
    model = random_halting_model(seed=23).eval()
    model.config.halt_threshold = tau
    model.generation_config.eos_token_id = None
    ids, mask, _ = left_padded_batch([6, 4], 6, seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    general = model.generate(ids, fast_decode=False, **kwargs)
    steps = count_calls(monkeypatch, ponder, "decode_step")
    packed = count_calls(monkeypatch, ponder, "ponder_packed")
    monkeypatch.setattr("model.modeling.decode_step", ponder.decode_step)
    monkeypatch.setattr("model.modeling.ponder_packed", ponder.ponder_packed)
    fast = model.generate(ids, **kwargs)
    assert torch.equal(fast, general)
    assert (len(steps), len(packed)) == (7, 1), "the prefill runs the general path, every step the fast one"
    for b in range(2):
        single = model.generate(ids[b : b + 1, -int(mask[b].sum()) :], max_new_tokens=8, do_sample=False)
        assert torch.equal(single[0], general[b, -single.shape[1] :])


def test_a_halted_token_runs_no_further_pass_at_batch_one():
    model = random_halting_model(seed=24).eval()
    ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    cache = AdaPonderCache(model.config, max_length=16)
    model(ids[:, :4], cache=cache)
    rows = []
    hook = model.gpt_neox.layers[0].mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    for t in range(4, 16):
        rows.clear()
        out = model(ids[:, t : t + 1], cache=cache)
        assert len(rows) == int(out.passes) and sum(rows) == int(out.passes)
    hook.remove()
    assert set(cache.passes[0, 4:].tolist()) == {1, 2, 3, 4}


def test_decode_bytes_count_the_parameters_each_pass_reads():
    model = random_halting_model(seed=25)
    cfg = model.config
    k, d, v = cfg.num_passes, cfg.hidden_size, cfg.vocab_size
    numel = {name: p.numel() for name, p in model.named_parameters()}
    gates = sum(n for name, n in numel.items() if name.startswith("ponder_gates.0."))
    backbone = sum(n for name, n in numel.items() if name.startswith(("gpt_neox.layers.", "gpt_neox.final")))
    context = 7
    full = decode_bytes(cfg, torch.ones(k, 1, 1, dtype=torch.bool), torch.full((1, 1), context))
    kv = k * cfg.num_hidden_layers * 2 * context * d
    expected = k * backbone + (k - 1) * gates + numel["embed_out.weight"] + (k - 1) * 2 * v * d + d + kv
    assert float(full["total"]) == 4 * expected
    halted = decode_bytes(cfg, torch.tensor([True] + [False] * (k - 1))[:, None, None], torch.full((1, 1), 1))
    assert float(halted["total"]) == 4 * (
        backbone + gates + numel["embed_out.weight"] + d + cfg.num_hidden_layers * 2 * d
    )


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [1, 4])
def test_a_batch_one_step_reports_its_statistics_from_the_host_passes(k):
    """At batch 1 the step's passes are a host int: passes, halted fraction, mean and FLOPs are
    arithmetic on it plus a few small tensors, not the [K, B, T] mask route (79 extra ops at K = 1,
    5% of a K = 1 step on CPU). The values are the general path's (the test above)."""
    model = random_halting_model(seed=22, num_passes=k).eval()
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(7))
    ops = {}
    for halting in (True, False):
        cache = AdaPonderCache(model.config, max_length=8)
        model(ids[:, :4], cache=cache)
        with torch.no_grad(), OpCounter() as counter:
            model(ids[:, 4:5], cache=cache, halt_threshold=0.0, output_halting=halting)
        ops[halting] = counter.ops
    extra_for_gates = 4 if k > 1 else 0  # torch.stack of the gates and its views
    assert ops[True] - ops[False] <= 28 + extra_for_gates, ops

"""Cache cropping and self-speculative decoding (model/speculative.py): exact against plain decoding."""

import pytest
import torch
from test_inference import left_padded_batch
from tiny_models import random_halting_model

from model import speculative
from model.inference import AdaPonderCache


def decode_steps(model, cache, ids, mask, positions, start, end):
    """Feed positions [start, end) one per call into `cache`."""
    for t in range(start, end):
        model(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            position_ids=positions[:, t : t + 1],
            cache=cache,
        )


def assert_same_cache(a, b):
    assert a.seq_length == b.seq_length
    assert torch.equal(a.kv, b.kv)  # the whole capacity: dropped positions are zero again
    assert torch.equal(a._real_BC, b._real_BC)
    assert torch.equal(a._passes_BC, b._passes_BC)


@pytest.mark.parametrize("keep", [0, 2, 5])
def test_crop_leaves_the_cache_built_for_the_kept_prefix(keep):
    model = random_halting_model(seed=3).eval()
    ids, mask, positions = left_padded_batch([12, 8, 5], 12, seed=4)
    prefill, total = 5, 12
    with torch.no_grad():
        cropped = AdaPonderCache(model.config, max_length=16)
        model(
            ids[:, :prefill],
            attention_mask=mask[:, :prefill],
            position_ids=positions[:, :prefill],
            cache=cropped,
        )
        decode_steps(model, cropped, ids, mask, positions, prefill, total)
        assert set(cropped.passes[:, prefill:][cropped.real[:, prefill:]].tolist()) == {1, 2, 3, 4}
        assert cropped.is_croppable
        cropped.crop(prefill + keep - total if keep % 2 else prefill + keep)  # negative: drop from the end
        fresh = AdaPonderCache(model.config, max_length=16)
        model(
            ids[:, :prefill],
            attention_mask=mask[:, :prefill],
            position_ids=positions[:, :prefill],
            cache=fresh,
        )
        decode_steps(model, fresh, ids, mask, positions, prefill, prefill + keep)
        assert_same_cache(cropped, fresh)
        # Decoding goes on from the cropped cache exactly as from the fresh one.
        decode_steps(model, cropped, ids, mask, positions, prefill + keep, total)
        decode_steps(model, fresh, ids, mask, positions, prefill + keep, total)
    assert_same_cache(cropped, fresh)


def test_crop_rejects_more_than_it_holds():
    model = random_halting_model(seed=3).eval()
    cache = AdaPonderCache(model.config)
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    cache.crop(5)  # longer than held: nothing to drop
    assert cache.seq_length == 3
    with pytest.raises(ValueError, match="crop"):
        cache.crop(-4)


MODELS = {
    "adaptive": lambda: random_halting_model(seed=3).eval(),
    "adaptive-sequential-residual": lambda: random_halting_model(seed=4, use_parallel_residual=False).eval(),
    "ponderlm": lambda: random_halting_model(seed=5, adaptive=False).eval(),
}


@pytest.fixture
def recorded_stats(monkeypatch):
    """SpeculationStats of every speculative_loop that generate() runs."""
    stats = []

    def recording_loop(*args, **kwargs):
        sequences, s = real_loop(*args, **kwargs)
        stats.append(s)
        return sequences, s

    real_loop = speculative.speculative_loop
    monkeypatch.setattr(speculative, "speculative_loop", recording_loop)
    return stats


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_speculation_is_plain_greedy_with_padding_and_eos(name, recorded_stats):
    model = MODELS[name]()
    ids, mask, _ = left_padded_batch([9, 6, 3], 9, seed=7)
    args = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        # EOS: a token sequence 0 generates early, so that sequences finish at different steps.
        eos = int(model.generate(ids, **args)[0, 9 + 4])
        plain = model.generate(ids, eos_token_id=eos, **args)
        for n in (1, 3, 8):
            spec = model.generate(
                ids, eos_token_id=eos, assistant_early_exit=1, num_assistant_tokens=n, **args
            )
            assert torch.equal(spec, plain), n
            # One sequence alone: no batch minimum, longer accepted runs.
            alone = model.generate(
                ids[1:2, 3:],
                eos_token_id=eos,
                assistant_early_exit=1,
                num_assistant_tokens=n,
                **{**args, "attention_mask": mask[1:2, 3:]},
            )
            assert torch.equal(
                alone,
                model.generate(ids[1:2, 3:], eos_token_id=eos, **{**args, "attention_mask": mask[1:2, 3:]}),
            )
    # Sequence 0 finished while others went on (padding after its EOS).
    assert plain.shape[1] > 9 + plain[0, 9:].tolist().index(eos) + 1
    assert len(recorded_stats) == 6
    # Both branches ran: drafts the full model agreed with, and drafts it corrected.
    assert sum(s.agreed for s in recorded_stats) > 0
    assert sum(s.drafted - s.agreed for s in recorded_stats) > 0
    assert max(s.tokens_per_cycle for s in recorded_stats) > 1.5

"""The evaluation baselines' exits (model.ponder.ponder_loop): fixed exits on plain PonderLM, fixed
exits without the gates' scaling of the updates, and the training-free confidence exit. Each runs in
the packed strategy (the default) and in the every-row definition with the same numbers."""

import pytest
import torch
from helpers import VOCAB, random_halting_model, tiny

from model import AdaPonderForCausalLM
from model.inference import AdaPonderCache


def _plain(seed: int = 0) -> AdaPonderForCausalLM:
    torch.manual_seed(seed)
    return AdaPonderForCausalLM(tiny(adaptive=False, num_passes=4)).eval()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    exits = torch.randint(1, 5, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # right padding
    return ids, mask, exits


def _both(model, ids, mask, **knobs):
    """The packed and the every-row forward of the same call (logits on real positions, passes)."""
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, **knobs)
        dense = model(ids, attention_mask=mask, dense=True, **knobs)
    real = mask.bool()
    torch.testing.assert_close(packed.logits[real], dense.logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.passes[real], dense.passes[real])
    return packed


def test_fixed_exits_prune_plain_ponderlm_in_both_strategies():
    model = _plain()
    ids, mask, exits = _batch()
    out = _both(model, ids, mask, exit_passes=exits)
    real = mask.bool()
    assert torch.equal(out.passes[real], exits[real])
    # Every token at K passes is plain PonderLM itself; fewer passes change the predictions.
    full = _both(model, ids, mask, exit_passes=torch.full_like(exits, 4))
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
    torch.testing.assert_close(full.logits[real], plain.logits[real])
    assert not torch.allclose(out.logits[real], plain.logits[real])


def test_fixed_exits_without_the_gates_scaling_update_by_the_full_step():
    model = random_halting_model(seed=3).eval()
    ids, mask, exits = _batch(1)
    kept = _both(model, ids, mask, exit_passes=exits)
    neutral = _both(model, ids, mask, exit_passes=exits, gate_scaling=False)
    real = mask.bool()
    assert torch.equal(kept.passes, neutral.passes)
    # Tokens that run one pass never see an update; the others do, scaled by s or not.
    one = real & (exits == 1)
    torch.testing.assert_close(kept.logits[one], neutral.logits[one])
    assert not torch.allclose(kept.logits[real & (exits > 1)], neutral.logits[real & (exits > 1)])
    # With every gate forced open (s = 1), dropping the scaling changes nothing.
    with torch.no_grad():
        for gate in model.ponder_gates:
            gate.dense_out.weight.zero_()
            gate.dense_out.bias.fill_(60.0)  # sigmoid(60) = 1 in fp32
    opened = _both(model, ids, mask, exit_passes=exits)
    torch.testing.assert_close(
        opened.logits[real], _both(model, ids, mask, exit_passes=exits, gate_scaling=False).logits[real]
    )


def _pass_outputs(model, ids, exits) -> list[torch.Tensor]:
    """h^i [B, T, D] of every pass of the every-row strategy (its final norm runs once a pass)."""
    captured = []
    handle = model.gpt_neox.final_layer_norm.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(ids, exit_passes=exits, dense=True)
    handle.remove()
    return captured


def _confidence(model, h):
    return torch.softmax(model.embed_out(h).float(), -1).amax(-1)


def _first_confident_pass(model, ids, threshold: float) -> torch.Tensor:
    """Passes a token runs under the confidence exit, by fixing the exits pass by pass (a pass's
    outputs depend only on the exits before it)."""
    exits = torch.full_like(ids, 4)
    for i in range(3):
        confident = _confidence(model, _pass_outputs(model, ids, exits)[i]) >= threshold
        exits = torch.where((exits == 4) & confident, torch.full_like(exits, i + 1), exits)
    return exits


def test_the_confidence_exit_stops_a_token_once_its_pass_is_sure():
    model = _plain(seed=5)
    ids, mask, _ = _batch(2)
    real = mask.bool()
    assert torch.equal(_both(model, ids, mask, exit_confidence=1e-9).passes[real], torch.ones_like(ids)[real])
    assert torch.equal(
        _both(model, ids, mask, exit_confidence=1.0).passes[real], torch.full_like(ids, 4)[real]
    )
    # A threshold between the passes' confidences: some tokens stop after each pass.
    unpadded = ids[:2]
    passes = _pass_outputs(model, unpadded, torch.full_like(unpadded, 4))
    threshold = float(torch.cat([_confidence(model, h).flatten() for h in passes[:3]]).quantile(0.4))
    expected = _first_confident_pass(model, unpadded, threshold)
    assert len(expected.unique()) >= 3
    out = _both(model, ids, mask, exit_confidence=threshold)
    assert torch.equal(out.passes[:2], expected)


def test_exit_knobs_refuse_bad_values_and_cached_calls():
    model = _plain()
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="exit_confidence must be in"):
        model(ids, exit_confidence=0.0)
    cache = AdaPonderCache(model.config)
    with pytest.raises(ValueError, match="uncached calls"):
        model(ids, cache=cache, use_cache=True, exit_confidence=0.5)
    with pytest.raises(ValueError, match="uncached calls"):
        model(ids, cache=cache, use_cache=True, gate_scaling=False)

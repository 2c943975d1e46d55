"""Cache cropping and self-speculative decoding (model/speculative.py): exact against plain decoding."""

import pytest
import torch
from helpers import left_padded_batch, random_halting_model, save_tiny_tokenizer

from launcher import generate as generate_cli
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
    one_pass_steps = []  # the drafts run through the decode step (model.ponder.decode_step), pass 1 only
    step = model.decode
    model.decode = lambda *a, **k: one_pass_steps.append(a[4]) or step(*a, **k)
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
    assert one_pass_steps.count(1) >= sum(s.drafted for s in recorded_stats) // 3  # drafted counts rows
    # Both branches ran: drafts the full model agreed with, and drafts it corrected.
    assert sum(s.agreed for s in recorded_stats) > 0
    assert sum(s.drafted - s.agreed for s in recorded_stats) > 0
    # Some cycle emitted several tokens per sequence (the crop after a partial acceptance ran).
    assert max(s.tokens_per_cycle for s in recorded_stats) > 1.0


def chi_square_critical(df: int, z: float = 3.72) -> float:
    """Upper critical value of chi-square with `df` degrees of freedom at the normal quantile `z`
    (3.72: p = 1e-4), by the Wilson-Hilferty approximation."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * c**0.5) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of `counts` against `probs` (cells of probability 0 must be empty)."""
    expected = probs.double() * counts.sum()
    assert counts[expected == 0].sum() == 0
    used = expected > 0
    return float(((counts[used] - expected[used]) ** 2 / expected[used]).sum())


def test_acceptance_rule_samples_the_full_model_at_every_drafted_position():
    torch.manual_seed(0)
    rows, vocab = 40000, 5
    p_NV = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.05, 0.05, 0.1, 0.3, 0.5]])
    q_NV = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.4, 0.3, 0.1, 0.1, 0.1]])
    drafts_BN = torch.multinomial(q_NV, rows, replacement=True).T  # [rows, 2], position j from q_j
    agreed_B, tokens_BN = speculative.accept_sampled(
        p_NV.log().expand(rows, -1, -1), q_NV.log().expand(rows, -1, -1), drafts_BN
    )
    first = torch.bincount(tokens_BN[:, 0], minlength=vocab)
    # The second token is emitted only after the first draft was accepted.
    second = torch.bincount(tokens_BN[agreed_B >= 1, 1], minlength=vocab)
    critical = chi_square_critical(vocab - 1)
    assert chi_square(first, p_NV[0]) < critical
    assert chi_square(second, p_NV[1]) < critical
    # The test can fail: the drafts themselves (q) are far from p.
    assert chi_square(torch.bincount(drafts_BN[:, 0], minlength=vocab), p_NV[0] + 1e-3) > 100 * critical
    # Acceptance probability sum_x min(p, q) per position.
    accept_rate = torch.minimum(p_NV[0], q_NV[0]).sum().item()
    torch.testing.assert_close((agreed_B >= 1).double().mean().item(), accept_rate, atol=0.02, rtol=0)


def test_sampled_speculation_has_the_distribution_of_plain_sampling(recorded_stats):
    vocab, samples, temperature = 8, 6000, 0.7
    model = random_halting_model(seed=11, vocab_size=vocab).eval()
    model.config.halt_threshold = 0.2
    model.generation_config.eos_token_id = (
        None  # no EOS: two tokens in every sample  # most tokens go on after pass 1: drafts are often wrong
    )
    with torch.no_grad():
        model.embed_out.weight.mul_(3.0)  # peaked distributions, pass 1 and the full model disagreeing
        prompt = torch.tensor([[3, 1, 4, 1, 5]])
        # Exact joint distribution of the first two sampled tokens: p(t1) p(t2 | t1).
        p1_V = (model(prompt).logits[0, -1] / temperature).softmax(-1)
        prompts = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        p2_VV = (model(prompts).logits[:, -1] / temperature).softmax(-1)
        joint = (p1_V[:, None] * p2_VV).flatten()
        # The draft's distribution of t2 (pass 1 only) differs: the test could tell them apart.
        q2_VV = (model(prompts, max_passes=1).logits[:, -1] / temperature).softmax(-1)
        assert ((p2_VV - q2_VV).abs().sum(-1) / 2 * p1_V).sum() > 0.1
        torch.manual_seed(0)
        out = model.generate(
            prompt.expand(samples, -1),
            do_sample=True,
            temperature=temperature,
            top_k=None,
            max_new_tokens=2,
            pad_token_id=0,
            assistant_early_exit=1,
            num_assistant_tokens=2,
        )
    counts = torch.bincount(out[:, 5] * vocab + out[:, 6], minlength=vocab * vocab)
    assert chi_square(counts, joint) < chi_square_critical(int((joint > 0).sum()) - 1)
    assert recorded_stats[0].drafted > recorded_stats[0].agreed > 0


def test_generate_command_speculative_prints_what_plain_decoding_prints(tmp_path, capsys):
    model = random_halting_model(seed=16).eval()
    model.config.halt_threshold = 0.3  # tokens go on after pass 1: drafts get rejected
    model.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    argv = ["--model", str(tmp_path), "--prompt", "w1 w2 w3", "--prompt", "w4", "--max-new-tokens", "12"]
    assert generate_cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert generate_cli.main(argv + ["--speculative", "3"]) == 0
    assert capsys.readouterr().out == plain  # tokens and the passes each took
    with pytest.raises(SystemExit):
        generate_cli.main(argv + ["--speculative", "-1"])


def test_unsupported_assisted_generation_settings_are_refused():
    model = random_halting_model(seed=3).eval()
    ids = torch.ones(1, 3, dtype=torch.long)
    args = dict(max_new_tokens=4, pad_token_id=0, assistant_early_exit=1)
    cases = [
        ({"assistant_early_exit": 2}, "assistant_early_exit must be 1"),
        ({"num_assistant_tokens_schedule": "heuristic"}, "constant"),
        ({"return_dict_in_generate": True}, "return_dict_in_generate"),
        ({"exit_passes": torch.ones(1, 3, dtype=torch.long)}, "exit_passes"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(ids, **{**args, **extra})

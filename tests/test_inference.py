"""Adaptive inference (model/inference.py): the sparse, cached forward against the dense one, the
cache's contents, generate() and the adaponder-generate command."""

import pytest
import torch
from helpers import VOCAB, left_padded_batch, random_halting_model, save_tiny_tokenizer, tiny
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from launcher import generate as generate_cli
from model import AdaPonderForCausalLM
from model.inference import AdaPonderCache

MODELS = {
    "adaptive": lambda: random_halting_model(seed=3).eval(),
    "adaptive-sequential-residual": lambda: random_halting_model(seed=4, use_parallel_residual=False).eval(),
    "ponderlm": lambda: random_halting_model(seed=5, adaptive=False).eval(),
    "one-pass": lambda: random_halting_model(seed=6, num_passes=1).eval(),
}


def decode_incrementally(model, ids, mask, positions, prefill):
    """Prefill `prefill` positions at once, then one position per call; logits, passes, cache."""
    cache = AdaPonderCache(model.config)
    outs = [
        model(
            ids[:, :prefill],
            attention_mask=mask[:, :prefill],
            position_ids=positions[:, :prefill],
            cache=cache,
        )
    ]
    for t in range(prefill, ids.shape[1]):
        outs.append(
            model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=positions[:, t : t + 1],
                cache=cache,
            )
        )
        assert outs[-1].cache is cache
    logits = torch.cat([o.logits for o in outs], 1)
    passes = torch.cat([o.passes for o in outs], 1)
    return logits, passes, cache


@pytest.mark.parametrize("name", list(MODELS))
def test_incremental_decoding_reproduces_the_parallel_forward(name):
    model = MODELS[name]()
    ids, mask, positions = left_padded_batch([14, 9, 5], 14, seed=1)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask, position_ids=positions, dense=True)
    logits, passes, cache = decode_incrementally(model, ids, mask, positions, prefill=4)
    real = mask.bool()
    k = model.config.num_passes
    if name.startswith("adaptive"):
        assert set(dense.passes[real].tolist()) == set(range(1, k + 1)), "every exit pass must occur"
    else:
        assert (dense.passes[real] == k).all()
    assert torch.equal(passes[real], dense.passes[real])
    assert torch.equal(cache.passes, dense.passes * real)
    torch.testing.assert_close(logits[real], dense.logits[real], atol=1e-5, rtol=1e-5)


def test_sparse_forward_without_cache_equals_dense_gates_and_statistics():
    model = random_halting_model(seed=8).eval()
    ids, mask, positions = left_padded_batch([16, 11], 16, seed=2)
    real = mask.bool()
    with torch.no_grad():
        dense = model(ids, attention_mask=mask, position_ids=positions, dense=True)
    sparse = model(ids, attention_mask=mask, position_ids=positions, dense=False)
    assert sparse.cache is None
    torch.testing.assert_close(sparse.logits[real], dense.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.gates[:, real], dense.gates[:, real], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sparse.halted_fraction, dense.halted_fraction)
    torch.testing.assert_close(sparse.mean_passes, dense.mean_passes)
    assert sparse.flops["total"] == pytest.approx(dense.flops["total"].item())


def test_prefill_in_chunks_equals_prefill_at_once():
    model = random_halting_model(seed=9).eval()
    ids, mask, positions = left_padded_batch([15, 12, 7], 15, seed=3)
    real = mask.bool()
    whole = AdaPonderCache(model.config)
    at_once = model(ids, attention_mask=mask, position_ids=positions, cache=whole)
    chunked = AdaPonderCache(model.config)
    logits, passes = [], []
    for start, end in ((0, 5), (5, 6), (6, 15)):
        out = model(
            ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            cache=chunked,
        )
        logits.append(out.logits)
        passes.append(out.passes)
    assert torch.equal(torch.cat(passes, 1)[real], at_once.passes[real])
    torch.testing.assert_close(torch.cat(logits, 1)[real], at_once.logits[real], atol=1e-5, rtol=1e-5)
    for i in range(model.config.num_passes):
        for layer in range(model.config.num_hidden_layers):
            for got, want in ((chunked.keys, whole.keys), (chunked.values, whole.values)):
                torch.testing.assert_close(
                    got(i, layer).transpose(1, 2)[real], want(i, layer).transpose(1, 2)[real]
                )


def test_cache_entries_after_halting_are_the_last_active_pass_and_match_training_alignment():
    model = random_halting_model(seed=10).eval()
    ids, mask, positions = left_padded_batch([13, 10], 13, seed=4)
    real = mask.bool()
    # The dense forward's aligned K/V of every pass and layer, as training computes them.
    aligned = {i: [] for i in range(model.config.num_hidden_layers)}
    handles = [
        layer.register_forward_hook(lambda mod, args, out, i=i: aligned[i].append((out[1], out[2])))
        for i, layer in enumerate(model.gpt_neox.layers)
    ]
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, dense=True)
    for h in handles:
        h.remove()
    cache = AdaPonderCache(model.config)
    model(ids, attention_mask=mask, position_ids=positions, cache=cache)
    exit_pass = cache.passes - 1
    halted_early = real & (exit_pass < model.config.num_passes - 1)
    assert halted_early.sum() >= 5
    for layer in range(model.config.num_hidden_layers):
        for i in range(model.config.num_passes):
            keys, values = cache.keys(i, layer), cache.values(i, layer)
            for b, t in (real & (exit_pass < i)).nonzero().tolist():
                assert torch.equal(keys[b, :, t], cache.keys(exit_pass[b, t], layer)[b, :, t])
                assert torch.equal(values[b, :, t], cache.values(exit_pass[b, t], layer)[b, :, t])
            dense_k, dense_v = aligned[layer][i]
            torch.testing.assert_close(keys.transpose(1, 2)[real], dense_k.transpose(1, 2)[real])
            torch.testing.assert_close(values.transpose(1, 2)[real], dense_v.transpose(1, 2)[real])


def count_rows(module, calls):
    return module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[-2]))


def test_halted_tokens_are_never_computed_and_empty_passes_are_skipped():
    model = random_halting_model(seed=11).eval()
    ids, mask, positions = left_padded_batch([12, 8], 12, seed=5)
    mlp_rows, head_rows = [], []
    handles = [count_rows(model.gpt_neox.layers[0].mlp, mlp_rows), count_rows(model.embed_out, head_rows)]
    out = model(ids, attention_mask=mask, position_ids=positions, dense=False, logits_to_keep=1)
    passes = out.passes[mask.bool()]
    k = model.config.num_passes
    assert mlp_rows == [int((passes > i).sum()) for i in range(k)]
    # Head + mixture for tokens going on to the next pass, then the last position of each sequence.
    assert head_rows == [int((passes > i + 1).sum()) for i in range(k - 1)] + [1]
    assert out.logits.shape == (2, 1, VOCAB)

    with torch.no_grad():  # every gate closed: one pass, the others skipped entirely
        for gate in model.ponder_gates:
            gate.dense_out.weight.zero_()
            gate.dense_out.bias.fill_(-50.0)
    mlp_rows.clear()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions, dense=False)
    assert mlp_rows == [int(mask.sum())]
    assert (out.passes[mask.bool()] == 1).all()
    # Recording gradients (training, ZeRO-3): every module runs in every pass, with no rows if need be.
    mlp_rows.clear()
    model(ids, attention_mask=mask, position_ids=positions, dense=False).logits.sum().backward()
    assert mlp_rows == [int(mask.sum())] + [0] * (k - 1)
    for h in handles:
        h.remove()


def test_greedy_generate_with_left_padding_matches_dense_recomputation():
    model = random_halting_model(seed=12).eval()
    model.generation_config.eos_token_id = None  # run all steps (EOS is tested below)
    ids, mask, _ = left_padded_batch([7, 4, 2], 7, seed=6)
    new = 9
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(new):
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(seq, attention_mask=seq_mask, position_ids=positions, dense=True).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], 1)
    assert torch.equal(generated, seq)


def test_sampling_generate_equals_uncached_generation_and_stops_at_eos():
    model = random_halting_model(seed=13).eval()
    ids, mask, _ = left_padded_batch([6, 3], 6, seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=0.9, pad_token_id=0)
    torch.manual_seed(0)
    cached = model.generate(ids, **kwargs)
    torch.manual_seed(0)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    eos = int(cached[0, 6 + 2])  # the third token of the first sequence
    torch.manual_seed(0)
    stopped = model.generate(ids, eos_token_id=eos, **kwargs)
    assert torch.equal(stopped[0, : 6 + 3], cached[0, : 6 + 3])
    assert (stopped[0, 6 + 3 :] == 0).all()


def test_beam_search_with_the_cache_equals_uncached_beam_search():
    model = random_halting_model(seed=17).eval()
    model.generation_config.eos_token_id = None
    ids, mask, _ = left_padded_batch([5, 3], 5, seed=9)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_one_pass_generation_equals_transformers_gpt_neox(tmp_path):
    torch.manual_seed(14)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path)
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    ours = AdaPonderForCausalLM.from_pythia(str(tmp_path), num_passes=1).eval()
    ids, mask, _ = left_padded_batch([5, 3], 5, seed=8)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), hf.generate(ids, **kwargs))


def test_cache_memory_and_user_errors():
    model = random_halting_model(seed=15).eval()
    cfg = model.config
    ids = torch.randint(1, VOCAB, (2, 6))
    cache = AdaPonderCache(cfg, max_length=10)
    model(ids, cache=cache)
    per_token = cfg.num_passes * cfg.num_hidden_layers * 2 * cfg.hidden_size * 4 + 2
    assert cache.memory_bytes() == 2 * 10 * per_token
    assert cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="batch of 2"):
        model(ids[:1], cache=cache)
    with pytest.raises(ValueError, match="attention_mask covers"):
        model(ids[:, :1], attention_mask=torch.ones(2, 3), cache=cache)
    with pytest.raises(ValueError, match="AdaPonderCache"):
        model(ids, cache=object())
    with pytest.raises(ValueError, match="made for"):
        model(ids, cache=AdaPonderCache(tiny(num_passes=2)))
    with pytest.raises(ValueError, match="sparse path"):
        model(ids, cache=AdaPonderCache(cfg), dense=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(ids, cache=AdaPonderCache(cfg), use_cache=False, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="for inference"):
        model.train()(ids, cache=AdaPonderCache(cfg))


def test_generate_command_prints_completions_with_passes(tmp_path, capsys):
    random_halting_model(seed=16).eval().save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    argv = ["--model", str(tmp_path), "--prompt", "w1 w2 w3", "--prompt", "w4", "--max-new-tokens", "6"]
    assert generate_cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("w1 w2 w3") and lines[2].startswith("w4")
    for line in (lines[0], lines[2]):
        digits = [int(piece.split("]")[0]) for piece in line.split("[")[1:]]
        assert digits and all(1 <= d <= 4 for d in digits)
    assert "passes per token" in lines[1]
    with pytest.raises(SystemExit):
        generate_cli.main(argv + ["--greedy", "--temperature", "0.7"])

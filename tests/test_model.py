"""The AdaPonderLM model against `transformers`, against slow reference loops, and its invariants."""

import math

import pytest
import torch
from helpers import VOCAB, random_halting_model, tiny
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from model import AdaPonderConfig, AdaPonderForCausalLM
from model.accounting import forward_flops
from model.hf_compat import gpt_neox_config
from model.modeling import bottom_k_gate_loss


def hf_checkpoint(tmp_path, rotary_pct=0.25, parallel=True, seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rotary_pct=rotary_pct,
        max_position_embeddings=64,
        use_parallel_residual=parallel,
        attn_implementation="eager",
    )
    hf = GPTNeoXForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    return hf


# -------------------------------------------------------------------------------------------------
# Parity with transformers at K = 1, and with PonderLM's loop at K passes.


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_one_pass_equals_transformers_gpt_neox(tmp_path, rotary_pct, parallel, batch):
    hf = hf_checkpoint(tmp_path, rotary_pct, parallel)
    ours = AdaPonderForCausalLM.from_pythia(str(tmp_path), num_passes=1).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, 12))
    mask = torch.ones_like(ids)
    mask[-1, :4] = 0  # left padding on the last sequence
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = hf(ids, attention_mask=attention_mask).logits
            got = ours(ids, attention_mask=attention_mask).logits
            keep = (mask if attention_mask is not None else torch.ones_like(ids)).bool()
            torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)


def ponderlm_reference(hf: GPTNeoXForCausalLM, ids, passes, scale, mult):
    """PonderLM's forward written against transformers' GPT-NeoX with `inputs_embeds`."""
    table = hf.gpt_neox.embed_in.weight * scale
    embeds = table[ids] * mult
    for i in range(passes):
        logits = hf(inputs_embeds=embeds).logits
        if i < passes - 1:
            embeds = embeds + logits.softmax(-1) @ table
    return logits


def test_ponderlm_checkpoint_equals_reference_loop(tmp_path):
    hf = hf_checkpoint(tmp_path)
    config_file = tmp_path / "config.json"
    raw = config_file.read_text()
    config_file.write_text(
        raw.replace(
            '"model_type"',
            '"pondering_steps": 3, "scale_embeds": true, "mutiply_pondering_steps": true, "model_type"',
        )
    )
    ours = AdaPonderForCausalLM.from_pythia(str(tmp_path)).eval()
    assert ours.config.num_passes == 4 and not ours.config.adaptive
    assert ours.config.scale_embeds and ours.config.multiply_pondering_steps
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = ponderlm_reference(hf, ids, passes=4, scale=32**0.5, mult=3.0)
        out = ours(ids)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.mean_passes.item() == 4.0


def test_vanilla_pythia_turns_ponder_scaling_off(tmp_path):
    hf_checkpoint(tmp_path)
    config = AdaPonderForCausalLM.from_pythia(str(tmp_path)).config
    assert not config.scale_embeds and not config.multiply_pondering_steps
    assert config.num_passes == 4 and config.adaptive


# -------------------------------------------------------------------------------------------------
# A slow, independent reference of the adaptive forward: explicit per-token loops, own LayerNorm,
# rotary and attention, and a per-token "last active K/V" store.


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _rotate(vec, pos, rotary, base):
    out = vec.clone()
    half = rotary // 2
    for j in range(half):
        theta = pos * base ** (-2 * j / rotary)
        a, b = vec[..., j], vec[..., j + half]
        out[..., j] = a * math.cos(theta) - b * math.sin(theta)
        out[..., j + half] = b * math.cos(theta) + a * math.sin(theta)
    return out


def adaptive_reference(model: AdaPonderForCausalLM, ids):
    cfg = model.config
    p = {k: v.detach() for k, v in model.named_parameters()}
    num_b, num_t = ids.shape
    n, hs, eps = cfg.num_attention_heads, cfg.head_size, cfg.layer_norm_eps
    table = p["gpt_neox.embed_in.weight"]
    embeds = table[ids] * cfg.embed_scale * cfg.base_mult
    active = torch.ones(num_b, num_t, dtype=torch.bool)
    exits = torch.full((num_b, num_t), cfg.num_passes)
    last_kv = {}
    h_out = torch.zeros(num_b, num_t, cfg.hidden_size)
    for i in range(cfg.num_passes):
        x = embeds.clone()
        for layer in range(cfg.num_hidden_layers):
            w = {
                k[len(f"gpt_neox.layers.{layer}.") :]: v
                for k, v in p.items()
                if k.startswith(f"gpt_neox.layers.{layer}.")
            }
            ln1 = _layer_norm(x, w["input_layernorm.weight"], w["input_layernorm.bias"], eps)
            qkv = ln1 @ w["attention.query_key_value.weight"].T + w["attention.query_key_value.bias"]
            qkv = qkv.view(num_b, num_t, n, 3 * hs)
            attn = torch.zeros(num_b, num_t, cfg.hidden_size)
            for b in range(num_b):
                q = {}
                for t in range(num_t):
                    qt, kt, vt = qkv[b, t, :, :hs], qkv[b, t, :, hs : 2 * hs], qkv[b, t, :, 2 * hs :]
                    q[t] = _rotate(qt, t, cfg.rotary_ndims, cfg.rotary_emb_base)
                    if active[b, t]:
                        last_kv[layer, b, t] = (_rotate(kt, t, cfg.rotary_ndims, cfg.rotary_emb_base), vt)
                for t in range(num_t):
                    keys = torch.stack([last_kv[layer, b, s][0] for s in range(t + 1)], 1)  # [N, S, H]
                    vals = torch.stack([last_kv[layer, b, s][1] for s in range(t + 1)], 1)
                    weights = torch.softmax((keys @ q[t][:, :, None]).squeeze(-1) / hs**0.5, -1)
                    attn[b, t] = (weights[:, None, :] @ vals).reshape(-1)
            attn = attn @ w["attention.dense.weight"].T + w["attention.dense.bias"]
            ln2_in = x if cfg.use_parallel_residual else x + attn
            ln2 = _layer_norm(
                ln2_in, w["post_attention_layernorm.weight"], w["post_attention_layernorm.bias"], eps
            )
            hidden = torch.nn.functional.gelu(
                ln2 @ w["mlp.dense_h_to_4h.weight"].T + w["mlp.dense_h_to_4h.bias"]
            )
            mlp = hidden @ w["mlp.dense_4h_to_h.weight"].T + w["mlp.dense_4h_to_h.bias"]
            x = x + attn + mlp if cfg.use_parallel_residual else ln2_in + mlp
        h = _layer_norm(x, p["gpt_neox.final_layer_norm.weight"], p["gpt_neox.final_layer_norm.bias"], eps)
        h_out[active] = h[active]
        if i == cfg.num_passes - 1:
            break
        s = model.ponder_gates[i](h).detach()
        for b in range(num_b):
            for t in range(num_t):
                if not active[b, t]:
                    continue
                if s[b, t] < cfg.halt_threshold:
                    active[b, t] = False
                    exits[b, t] = i + 1
                else:
                    probs = torch.softmax(h[b, t] @ p["embed_out.weight"].T, -1)
                    embeds[b, t] = embeds[b, t] + s[b, t] * (probs @ table) * cfg.embed_scale
    return h_out @ p["embed_out.weight"].T, exits


@pytest.mark.parametrize("parallel", [True, False])
def test_dense_training_forward_equals_slow_reference(parallel):
    model = random_halting_model(seed=3, use_parallel_residual=parallel, multiply_pondering_steps=True)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    out = model(ids)
    expected_logits, expected_passes = adaptive_reference(model, ids)
    assert set(expected_passes.flatten().tolist()) == {1, 2, 3, 4}, "every exit pass must be exercised"
    assert torch.equal(out.passes, expected_passes)
    torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------
# Halting invariants.


def capture_kv(model):
    """Forward hook on every layer call: list (per layer) of per-pass (K, V)."""
    store = {i: [] for i in range(model.config.num_hidden_layers)}
    handles = [
        layer.register_forward_hook(
            lambda mod, args, out, i=i: store[i].append((out[1].detach(), out[2].detach()))
        )
        for i, layer in enumerate(model.gpt_neox.layers)
    ]
    return store, handles


def test_mask_is_monotonic_and_statistics_consistent():
    model = random_halting_model(seed=5)
    ids = torch.randint(0, VOCAB, (3, 16))
    out = model(ids)
    gates = out.gates  # [K-1, B, T]
    tau = model.config.halt_threshold
    active = torch.ones_like(ids, dtype=torch.bool)
    for i in range(gates.shape[0]):
        next_active = active & (gates[i] >= tau)
        assert not (next_active & ~active).any()  # once halted, never active again
        assert (gates[i][~active] == 0).all()  # halted tokens' gates are constant zeros
        active = next_active
    assert torch.equal(out.passes, 1 + (gates >= tau).long().cumprod(0).sum(0))
    counts = torch.bincount(out.passes.flatten() - 1, minlength=4).double() / ids.numel()
    torch.testing.assert_close(out.halted_fraction, counts)
    assert out.mean_passes.item() == pytest.approx(out.passes.double().mean().item())


def test_halted_tokens_kv_and_outputs_frozen_when_later_passes_change():
    model = random_halting_model(seed=7).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
    store, handles = capture_kv(model)
    with torch.no_grad():
        out = model(ids, dense=True)
    exit_pass = out.passes - 1  # index of each token's last active pass
    for per_pass in store.values():
        for i, (k, v) in enumerate(per_pass):
            for b, t in (exit_pass < i).nonzero().tolist():
                k_exit, v_exit = per_pass[exit_pass[b, t]]
                assert torch.equal(k[b, :, t], k_exit[b, :, t]) and torch.equal(v[b, :, t], v_exit[b, :, t])
    for h in handles:
        h.remove()

    halted_first = out.passes == 1
    assert halted_first.any() and (~halted_first).any()
    with torch.no_grad():
        for gate in model.ponder_gates[1:]:
            gate.dense_in.weight.add_(torch.randn_like(gate.dense_in.weight))
        perturbed = model(ids, dense=True)
    assert torch.equal(perturbed.logits[halted_first], out.logits[halted_first])
    changed = (perturbed.logits - out.logits).abs().amax(-1) > 1e-4
    assert changed[out.passes > 2].any(), "the perturbation must reach tokens still pondering"


def test_gradients_reach_every_gate_and_backbone_parameter():
    model = random_halting_model(seed=9)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 16))
    out = model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.2)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_halting_model(seed=11)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 10))
    model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.2).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids, ponder_lambda=0.1, ponder_k=0.2).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5)


def test_bottom_k_loss_hand_computed():
    gates = torch.tensor([[[0.9, 0.2, 0.5, 0.05]], [[0.3, 0.0, 0.7, 0.6]]])  # [U=2, B=1, T=4]
    real = torch.tensor([[True, True, True, False]])  # last position is padding
    # real values: 0.9 0.2 0.5 | 0.3 0.0 0.7 -> bottom half (3 of 6) = 0.0, 0.2, 0.3
    assert bottom_k_gate_loss(gates, real, 0.5).item() == pytest.approx(0.5 / 3)
    assert bottom_k_gate_loss(gates, real, 0.1).item() == 0.0  # floor(0.6) = 0 values selected
    assert bottom_k_gate_loss(gates, real, 1.0).item() == pytest.approx(2.6 / 6)


def test_loss_is_cross_entropy_plus_lambda_bottom_k():
    model = random_halting_model(seed=12)
    ids = torch.randint(0, VOCAB, (2, 9))
    out = model(ids, labels=ids, ponder_lambda=0.3, ponder_k=0.25)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    real = torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(out.ponder_loss, bottom_k_gate_loss(out.gates, real, 0.25))
    torch.testing.assert_close(out.loss, ce + 0.3 * out.ponder_loss)
    unshifted = model(ids[:, :-1], labels=ids[:, 1:], shift_labels=False)
    torch.testing.assert_close(unshifted.lm_loss, model(ids, labels=ids).lm_loss, atol=1e-6, rtol=1e-6)


def test_flops_breakdown_hand_computed():
    config = AdaPonderConfig(
        vocab_size=10,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
        gate_intermediate_size=8,
        num_passes=2,
        rotary_pct=0.5,
    )
    active = torch.tensor([[[True, True, True]], [[True, False, True]]])  # [K=2, B=1, T=3]
    real = torch.ones(1, 3, dtype=torch.bool)
    flops = {k: v.item() for k, v in forward_flops(config, active, real).items()}
    # backbone 2*(4*16 + 2*4*8) = 256 per token-pass, 5 token-passes
    # attention 4*L*D = 16 per key: contexts 1+2+3 (pass 0) + 1+3 (pass 1)
    # head 2*D*V = 80 per token; mixture 4*D*V = 160 per continuing token; gate 2*(4*8 + 8) = 80
    assert flops == {
        "backbone": 1280.0,
        "attention": 160.0,
        "head": 240.0,
        "mixture": 320.0,
        "gates": 240.0,
        "total": 2240.0,
        "dense_total": 1536.0 + 192.0 + 240.0 + 3 * 240.0,
    }


def test_flops_of_forward_match_its_halting_pattern():
    model = random_halting_model(seed=13)
    ids = torch.randint(0, VOCAB, (2, 8))
    out = model(ids)
    active = torch.stack([out.passes > i for i in range(4)])
    expected = forward_flops(model.config, active, torch.ones_like(ids, dtype=torch.bool))
    assert {k: v.item() for k, v in out.flops.items()} == {k: v.item() for k, v in expected.items()}
    assert out.flops["total"] < out.flops["dense_total"]


# -------------------------------------------------------------------------------------------------
# Presets, initialisation, errors, save/load.

# Total parameter counts from the Pythia suite (HF GPTNeoXForCausalLM, untied, vocab 50304).
PYTHIA_PARAMS = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
}


@pytest.mark.parametrize("name", sorted(PYTHIA_PARAMS))
def test_presets_have_pythia_shapes(name):
    config = AdaPonderConfig.from_preset(name, adaptive=False)
    with torch.device("meta"):
        model = AdaPonderForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == PYTHIA_PARAMS[name]
    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(gpt_neox_config(config))
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == {
        n.replace("lm_head", "embed_out"): tuple(p.shape) for n, p in hf.named_parameters()
    }
    assert config.multiply_pondering_steps == (name not in ("pythia-70m", "pythia-160m"))


def test_initialisation_follows_pythia_scaled_for_unrolled_depth():
    torch.manual_seed(0)
    config = tiny(hidden_size=256, num_attention_heads=4, intermediate_size=1024, gate_intermediate_size=1024)
    model = AdaPonderForCausalLM(config)
    small = math.sqrt(2 / (5 * 256))
    wang = 2 / (config.num_hidden_layers * config.num_passes * math.sqrt(256))
    layer = model.gpt_neox.layers[0]
    assert layer.attention.query_key_value.weight.std().item() == pytest.approx(small, rel=0.03)
    assert layer.attention.dense.weight.std().item() == pytest.approx(wang, rel=0.03)
    assert layer.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(wang, rel=0.03)
    assert model.gpt_neox.embed_in.weight.std().item() == pytest.approx(small, rel=0.03)
    assert layer.attention.dense.bias.abs().max().item() == 0.0
    assert all(gate.dense_out.bias.item() == config.gate_bias_init for gate in model.ponder_gates)
    out = model(torch.randint(0, VOCAB, (2, 16)))
    assert out.mean_passes.item() == config.num_passes  # at init every token ponders
    assert out.gates.min().item() > 0.9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_passes=0), "num_passes"),
        (dict(hidden_size=30, num_attention_heads=4), "divisible"),
        (dict(halt_threshold=1.5), "halt_threshold"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_unknown_preset_and_field_raise():
    with pytest.raises(ValueError, match="unknown preset"):
        AdaPonderConfig.from_preset("pythia-7b")
    with pytest.raises(ValueError, match="unknown config fields"):
        AdaPonderConfig.from_preset("tiny", num_pases=3)


def test_token_ids_outside_vocabulary_raise():
    model = AdaPonderForCausalLM(tiny())
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 2]]))


def test_save_pretrained_round_trip_and_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = random_halting_model(seed=14).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "adaponder"
    for loaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path),
        AdaPonderForCausalLM.from_pythia(str(tmp_path)),
    ):
        assert isinstance(loaded, AdaPonderForCausalLM)
        ids = torch.randint(0, VOCAB, (2, 8))
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)


def test_top_k_mixture_is_the_renormalised_top_k_of_the_softmax():
    torch.manual_seed(15)
    model = AdaPonderForCausalLM(tiny(ponder_topk=5))
    h = torch.randn(2, 3, 32)
    logits = model.embed_out(h)
    vals, idx = logits.topk(5, dim=-1)
    probs = torch.zeros_like(logits).scatter_(-1, idx, vals.softmax(-1))
    expected = probs @ model.gpt_neox.embed_in.weight * model.config.embed_scale
    torch.testing.assert_close(model.ponder_embedding(h), expected, atol=1e-6, rtol=1e-5)
    full = AdaPonderForCausalLM(tiny(ponder_topk=0))
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full.ponder_embedding(h), expected, atol=1e-4)


def test_exit_passes_replace_the_gates_halting_decision():
    model = random_halting_model(seed=17).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    learned = model(ids, dense=True)
    # Forcing the learned pattern reproduces the learned forward exactly.
    forced_same = model(ids, dense=True, exit_passes=learned.passes)
    assert torch.equal(forced_same.logits, learned.logits)
    # Any other pattern is run as given, with frozen outputs for the tokens it stops.
    pattern = torch.randint(1, 5, ids.shape, generator=torch.Generator().manual_seed(1))
    forced = model(ids, dense=True, exit_passes=pattern)
    assert torch.equal(forced.passes, pattern)
    assert not torch.allclose(forced.logits, learned.logits)
    with pytest.raises(ValueError, match="exit_passes must lie"):
        model(ids, dense=True, exit_passes=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="exit_passes has shape"):
        model(ids, exit_passes=pattern[:, 1:])

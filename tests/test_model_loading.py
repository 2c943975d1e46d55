"""Loading Pythia-format checkpoint directories: safetensors, sharded .bin with old buffers, errors."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from model import AdaPonderForCausalLM
from model.hf_compat import load_checkpoint_state_dict

VOCAB = 80


@pytest.fixture
def pythia(tmp_path):
    """A tiny Pythia-shaped model and the config.json a Pythia checkpoint of it would carry."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        rotary_pct=0.25,
        max_position_embeddings=64,
    )
    model = GPTNeoXForCausalLM(config).eval()
    # Old-style Pythia config.json: rotary_pct / rotary_emb_base rather than rope_parameters.
    old_config = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "hidden_act": "gelu",
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": 64,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    (tmp_path / "config.json").write_text(json.dumps(old_config))
    state = {k.replace("lm_head", "embed_out"): v.contiguous() for k, v in model.state_dict().items()}
    return model, state, tmp_path


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_loads_safetensors_with_lm_head_name(pythia):
    hf, state, root = pythia
    state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in state.items()}
    save_file(state, str(root / "model.safetensors"))
    ours = AdaPonderForCausalLM.from_pythia(str(root), num_passes=1)
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_loads_sharded_bin_with_pythia_buffers(pythia):
    hf, state, root = pythia
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        shard = {k: state[k] for k in keys}
        if file.endswith("1-of-00002.bin"):
            # Buffers old Pythia .bin files carry; they are not parameters.
            shard["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
            shard["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
            shard["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
        torch.save(shard, root / file)
        weight_map.update({k: file for k in shard})
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(load_checkpoint_state_dict(str(root))) == len(state) + 3
    ours = AdaPonderForCausalLM.from_pythia(str(root), num_passes=1)
    ids = torch.randint(0, VOCAB, (3, 11))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), atol=1e-5, rtol=1e-5)
    # With pondering on, only the new gates are initialised; the backbone is the checkpoint's.
    pondering = AdaPonderForCausalLM.from_pythia(str(root))
    assert pondering.config.num_passes == 4 and len(pondering.ponder_gates) == 3
    for name, param in pondering.named_parameters():
        if not name.startswith("ponder_gates."):
            assert torch.equal(param, state[name]), name


def test_shape_mismatch_names_the_tensor(pythia):
    _, state, root = pythia
    state["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = torch.zeros(100, 32)
    save_file(state, str(root / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.dense_h_to_4h\.weight.*config"):
        AdaPonderForCausalLM.from_pythia(str(root))


def test_missing_and_unexpected_tensors_raise(pythia):
    _, state, root = pythia
    partial = {k: v for k, v in state.items() if "layers.2." not in k}
    save_file(partial, str(root / "model.safetensors"))
    with pytest.raises(ValueError, match="missing parameters"):
        AdaPonderForCausalLM.from_pythia(str(root))
    save_file({**state, "gpt_neox.extra.weight": torch.zeros(2)}, str(root / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor"):
        AdaPonderForCausalLM.from_pythia(str(root))


def test_directory_without_weights_or_config_raises(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        AdaPonderForCausalLM.from_pythia(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt_neox",
                "vocab_size": 8,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    with pytest.raises(ValueError, match="nothing to load"):
        AdaPonderForCausalLM.from_pythia(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a GPT-NeoX"):
        AdaPonderForCausalLM.from_pythia(str(tmp_path))


def _config_dir(tmp_path, **fields):
    base = {"model_type": "gpt_neox", "vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps({**base, "num_attention_heads": 2, **fields}))
    return tmp_path


PONDERLM_410M = {
    "ponderinglm": True,
    "pondering_steps": 3,
    "scale_embeds": True,
    "mutiply_pondering_steps": True,
}


def test_ponderlm_config_brings_its_own_pondering_settings(tmp_path):
    from model.hf_compat import config_from_checkpoint

    config = config_from_checkpoint(_config_dir(tmp_path, **PONDERLM_410M))
    assert (config.num_passes, config.scale_embeds, config.multiply_pondering_steps) == (4, True, True)
    assert not config.adaptive
    vanilla = config_from_checkpoint(_config_dir(tmp_path, **{**PONDERLM_410M, "ponderinglm": False}))
    assert (vanilla.scale_embeds, vanilla.multiply_pondering_steps) == (False, False)  # a plain LM
    pythia = config_from_checkpoint(_config_dir(tmp_path))
    assert (pythia.scale_embeds, pythia.multiply_pondering_steps) == (False, False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale_embeds": None}, r"without \['scale_embeds'\]"),
        ({"mutiply_pondering_steps": None}, r"without \['mutiply_pondering_steps'\]"),
        ({"pondering_steps": None}, r"without \['pondering_steps'\]"),
        ({"ponderinglm": None, "scale_embeds": None}, r"without \['scale_embeds'\]"),
        ({"pondering_steps": 0}, "pondering_steps 0"),
        ({"pondering_steps": "3"}, "pondering_steps '3'"),
        ({"scale_embeds": "yes"}, "scale_embeds 'yes'"),
        ({"multiply_pondering_steps": True}, "'multiply_pondering_steps' in a gpt_neox config"),
    ],
)
def test_missing_or_inconsistent_ponderlm_fields_are_errors(tmp_path, change, message):
    from model.hf_compat import config_from_checkpoint

    fields = {k: v for k, v in {**PONDERLM_410M, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        config_from_checkpoint(_config_dir(tmp_path, **fields))


def test_adaponder_config_without_its_pondering_fields_is_an_error(tmp_path):
    from model import AdaPonderConfig
    from model.hf_compat import config_from_checkpoint

    full = json.loads(AdaPonderConfig(vocab_size=8, hidden_size=16, num_attention_heads=2).to_json_string())
    (tmp_path / "config.json").write_text(json.dumps(full))
    assert config_from_checkpoint(tmp_path).num_passes == 4
    del full["scale_embeds"]
    (tmp_path / "config.json").write_text(json.dumps(full))
    with pytest.raises(ValueError, match=r"without \['scale_embeds'\]"):
        config_from_checkpoint(tmp_path)

"""The two weight-init schemes (`init_scheme` of the model, `model.init` of a run)."""

import pytest
import torch

from model import AdaPonderConfig, AdaPonderForCausalLM
from training.config import read_config


def _residual_and_plain_std(scheme: str, layers: int = 6, passes: int = 4, d: int = 256):
    torch.manual_seed(0)
    config = AdaPonderConfig(
        vocab_size=512,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_passes=passes,
        init_scheme=scheme,
    )
    model = AdaPonderForCausalLM(config)
    layer = model.gpt_neox.layers[0]
    return layer.mlp.dense_4h_to_h.weight, layer.mlp.dense_h_to_4h.weight


def test_pythia_draws_wang_init_over_the_unrolled_depth():
    residual, plain = _residual_and_plain_std("pythia")
    d, depth = 256, 6 * 4
    assert residual.std().item() == pytest.approx(2.0 / (depth * d**0.5), rel=0.02)
    assert plain.std().item() == pytest.approx((2.0 / (5.0 * d)) ** 0.5, rel=0.02)
    assert residual.abs().max().item() > 3.5 * residual.std().item()  # untruncated normal tails


def test_ponderlm_residual_outputs_are_sqrt_lk_over_20_larger_and_truncated():
    pythia, _ = _residual_and_plain_std("pythia")
    ponderlm, plain = _residual_and_plain_std("ponderlm")
    depth = 6 * 4
    ratio = ponderlm.std().item() / pythia.std().item()
    # A normal cut at 3 std keeps 98.7% of its std.
    assert ratio == pytest.approx((depth / 20) ** 0.5 * 0.9866, rel=0.02)
    small = (2.0 / (5.0 * 256)) ** 0.5
    assert ponderlm.abs().max().item() <= 3 * small / (2 * depth) ** 0.5 + 1e-9
    assert plain.abs().max().item() <= 3 * small + 1e-9


def test_the_run_setting_defaults_to_ponderlm_from_a_preset_and_is_recorded():
    cfg = read_config(None, ["model.preset=tiny"])
    assert cfg.model_config().init_scheme == "ponderlm"
    cfg = read_config(None, ["model.preset=tiny", "model.init=pythia"])
    assert cfg.model_config().init_scheme == "pythia"
    assert cfg.model_config().to_dict()["init_scheme"] == "pythia"  # written to config.json


def test_a_checkpoint_without_the_field_reads_as_pythia():
    assert AdaPonderConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4}).init_scheme == "pythia"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.preset=tiny", "model.init=xavier"], "model.init"),
        (["model.preset=tiny", "model.overrides.init_scheme=pythia"], "model.overrides.init_scheme"),
    ],
)
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        read_config(None, overrides).model.validate()


def test_init_is_refused_for_continued_pretraining(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    cfg = read_config(None, [f"model.init_from={tmp_path}", "model.init=ponderlm"])
    with pytest.raises(ValueError, match=r"model\.init "):
        cfg.model.validate()

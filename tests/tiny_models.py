"""Tiny models shared by the model and inference tests (fp32, CPU, a few thousand parameters)."""

import torch

from model import AdaPonderConfig, AdaPonderForCausalLM

VOCAB = 96


def tiny(**overrides) -> AdaPonderConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        gate_intermediate_size=16,
        max_position_embeddings=64,
    )
    return AdaPonderConfig(**{**fields, **overrides})


def random_halting_model(seed: int = 0, **overrides) -> AdaPonderForCausalLM:
    """Gates with random weights around tau = 0.5, so tokens exit after every possible pass,
    differently per sequence and position. In training mode, as constructed."""
    torch.manual_seed(seed)
    model = AdaPonderForCausalLM(tiny(halt_threshold=0.5, **overrides))
    with torch.no_grad():
        for gate in model.ponder_gates:
            gate.dense_out.weight.normal_(0.0, 2.0)
            gate.dense_out.bias.fill_(0.8)
    return model

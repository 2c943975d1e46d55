"""Configuration of AdaPonderLM models and the named presets.

`AdaPonderConfig` keeps every GPT-NeoX field under its `GPTNeoXConfig` name so that a Pythia
`config.json` maps onto it field by field, and adds the pondering fields of docs/method.md:

    num_passes                K, passes of the whole backbone per token (PonderLM: steps + 1)
    scale_embeds              multiply embeddings and the mixture table by sqrt(d)
    multiply_pondering_steps  multiply the first input embedding by max(K - 1, 1)
    ponder_topk               restrict the pondering mixture to the k most probable tokens (0: off)
    halt_threshold            tau: a token halts when its gate s < tau
    max_passes                cap on passes per token at inference (None: num_passes); with tau, the
                              inference-time compute knob (both can also be passed to forward())
    gate_intermediate_size    width of each gate MLP (default 4d)
    gate_bias_init            initial output bias of the gates (positive: every token ponders at first)
    adaptive                  gates and halting on; off is plain PonderLM
    init_scheme               how a from-scratch model draws its weights: "pythia" (GPT-NeoX's
                              small_init, wang_init on the residual outputs over the unrolled depth)
                              or "ponderlm" (PonderLM's code: residual outputs sqrt(LK / 20) x larger)
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

INIT_SCHEMES = ("pythia", "ponderlm")

# Pythia's shapes (layers, hidden, heads), from the suite's config.json files; all use
# vocab 50304 (padded), rotary_pct 0.25, context 2048 and parallel residual.
_PYTHIA_SHAPES = {
    "pythia-70m": (6, 512, 8),
    "pythia-160m": (12, 768, 12),
    "pythia-410m": (24, 1024, 16),
    "pythia-1b": (16, 2048, 8),
    "pythia-1.4b": (24, 2048, 16),
    "pythia-2.8b": (32, 2560, 32),
}

# PonderLM multiplies the first embedding by the number of pondering steps from 410M up.
_MULTIPLY_FROM = {"pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b"}


def _pythia_preset(name: str) -> dict[str, Any]:
    layers, hidden, heads = _PYTHIA_SHAPES[name]
    return {
        "vocab_size": 50304,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "multiply_pondering_steps": name in _MULTIPLY_FROM,
    }


PRESETS: dict[str, dict[str, Any]] = {name: _pythia_preset(name) for name in _PYTHIA_SHAPES}
PRESETS["tiny"] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
}


class AdaPonderConfig(PretrainedConfig):
    """GPT-NeoX configuration plus AdaPonderLM's pondering and halting fields."""

    model_type = "adaponder"

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 512,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        rotary_pct: float = 0.25,
        rotary_emb_base: float = 10000.0,
        max_position_embeddings: int = 2048,
        layer_norm_eps: float = 1e-5,
        use_parallel_residual: bool = True,
        initializer_range: float = 0.02,
        num_passes: int = 4,
        scale_embeds: bool = True,
        multiply_pondering_steps: bool = False,
        ponder_topk: int = 0,
        halt_threshold: float = 1e-4,
        max_passes: int | None = None,
        gate_intermediate_size: int | None = None,
        gate_bias_init: float = 4.0,
        adaptive: bool = True,
        init_scheme: str = "pythia",
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.hidden_act = hidden_act
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.use_parallel_residual = use_parallel_residual
        self.initializer_range = initializer_range
        self.num_passes = num_passes
        self.scale_embeds = scale_embeds
        self.multiply_pondering_steps = multiply_pondering_steps
        self.ponder_topk = ponder_topk
        self.halt_threshold = halt_threshold
        self.max_passes = max_passes
        self.gate_intermediate_size = gate_intermediate_size or 4 * hidden_size
        self.gate_bias_init = gate_bias_init
        self.adaptive = adaptive
        self.init_scheme = init_scheme
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5 if self.scale_embeds else 1.0

    @property
    def base_mult(self) -> float:
        return float(max(self.num_passes - 1, 1)) if self.multiply_pondering_steps else 1.0

    def validate(self) -> None:
        """Raise `ValueError` naming the field when the configuration cannot describe a model."""
        if self.num_passes < 1:
            raise ValueError(f"num_passes must be >= 1, got {self.num_passes}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.rotary_ndims % 2 != 0:
            raise ValueError(
                f"rotary_pct ({self.rotary_pct}) x head size ({self.head_size}) must give an even "
                "number of rotary dims"
            )
        if not 0.0 <= self.halt_threshold < 1.0:
            raise ValueError(f"halt_threshold must be in [0, 1), got {self.halt_threshold}")
        if self.max_passes is not None and not 1 <= self.max_passes <= self.num_passes:
            raise ValueError(
                f"max_passes must be in [1, num_passes={self.num_passes}] or None, got {self.max_passes}"
            )
        if self.ponder_topk < 0 or self.ponder_topk > self.vocab_size:
            raise ValueError(f"ponder_topk must be in [0, vocab_size], got {self.ponder_topk}")
        for name in ("vocab_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"init_scheme must be one of {list(INIT_SCHEMES)}, got {self.init_scheme!r}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings is not supported: GPT-NeoX has an untied embed_out")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AdaPonderConfig:
        """Build a preset (`tiny`, `pythia-70m` ... `pythia-2.8b`) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        unknown = set(overrides) - set(cls().to_dict()) - {"intermediate_size", "gate_intermediate_size"}
        if unknown:
            raise ValueError(f"unknown config fields for preset {name!r}: {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

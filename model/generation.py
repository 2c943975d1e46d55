"""transformers' generation hooks for AdaPonderForCausalLM: its own per-pass cache instead of a
DynamicCache, the decode step's output, and self-speculative decoding behind assisted decoding.

The hooks' names and signatures are transformers' (transformers/generation/utils.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin

from model.accounting import active_from_passes, forward_flops, halting_stats, one_token_step_stats
from model.inference import checked_cache
from model.speculative import assisted_decoding


class PonderGenerationMixin(GenerationMixin):
    """The generation glue, mixed into AdaPonderForCausalLM."""

    def decode_output(
        self,
        input_ids_B1: torch.Tensor,
        position_ids: torch.Tensor | None,
        cache: Any,
        tau: float,
        num_run: int,
        use_cache: bool | None,
        output_halting: bool,
    ) -> Any:
        """forward()'s output for one new token per sequence through the decode step."""
        cfg, b, device = self.config, input_ids_B1.shape[0], input_ids_B1.device
        past_real_B = cache.real.sum(-1) if output_halting else None
        step = self.decode(input_ids_B1, position_ids, cache, tau, num_run, output_halting)
        out = self.output_class(
            logits=self.embed_out(step.h_out), cache=cache if use_cache is not False else None
        )
        if output_halting:
            with torch.no_grad():
                out.gates = torch.stack(step.gates)[..., None] if step.gates is not None else None
                if isinstance(step.passes, int):  # batch 1: the passes are on the host already
                    stats = one_token_step_stats(cfg, step.passes, past_real_B[0])
                    out.passes, out.halted_fraction, out.mean_passes, out.flops = stats
                    return out
                active_KB1 = active_from_passes(step.passes[:, None], cfg.num_passes)
                real_B1 = torch.ones(b, 1, dtype=torch.bool, device=device)
                out.passes, out.halted_fraction, out.mean_passes = halting_stats(active_KB1, real_B1)
                out.flops = forward_flops(cfg, active_KB1, real_B1, past_real_B)
        return out

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs of each generate() step, without the per-call halting statistics
        (the cache records every position's passes) unless the caller asks for them."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs.setdefault("output_halting", False)
        return inputs

    def prefill(self, input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict[str, Any]) -> Any:
        """generate()'s first forward over the prompt (transformers' prefill), returning its output."""
        return self._prefill(input_ids, generation_config, model_kwargs)

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        """generate()'s hook that puts a cache in `model_kwargs["cache"]`: ours, sized once for the
        whole generation, instead of a DynamicCache."""
        if generation_config.cache_implementation is not None:
            raise ValueError("cache_implementation is not supported: AdaPonderLM uses its own per-pass cache")
        if model_kwargs.get("cache") is not None and generation_config.use_cache is False:
            raise ValueError("a cache was passed with use_cache=False")
        if generation_config.use_cache is not False:
            # The last generated token is never fed back: max_length - 1 positions are cached.
            max_length = max(generation_config.max_length - 1, 1)
            model_kwargs["cache"] = checked_cache(model_kwargs.get("cache"), self.config, max_length)

    def _assisted_decoding(
        self,
        input_ids: torch.Tensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        inputs_tensor: torch.Tensor | None = None,
        assistant_model: Any = None,
        assistant_tokenizer: Any = None,
        tokenizer: Any = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """generate()'s assisted decoding, reached with `assistant_early_exit=1,
        num_assistant_tokens=n`: self-speculative decoding, pass 1 drafting n tokens and the
        remaining passes verifying them (model/speculative.py)."""
        if synced_gpus:
            raise ValueError("synced_gpus is not supported with assistant_early_exit")
        return assisted_decoding(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            streamer=streamer,
            assistant_model=assistant_model,
            **model_kwargs,
        )

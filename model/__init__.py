"""AdaPonderLM models: configuration, the pondering GPT-NeoX model, checkpoint loading.

Importing this package registers the `adaponder` model type with the `transformers` Auto classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from model.config import PRESETS, AdaPonderConfig
from model.modeling import AdaPonderForCausalLM, AdaPonderOutput

AutoConfig.register(AdaPonderConfig.model_type, AdaPonderConfig, exist_ok=True)
AutoModelForCausalLM.register(AdaPonderConfig, AdaPonderForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "AdaPonderConfig", "AdaPonderForCausalLM", "AdaPonderOutput"]

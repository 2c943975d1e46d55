"""Ship the model's own source files inside an exported checkpoint directory.

A directory whose `config.json` has `model_type: adaponder` loads through the `transformers` Auto
classes only where this package is imported. Copying the model files next to the weights, with
their imports made relative, and naming them in `config.json`'s `auto_map` lets any `transformers`
installation load it with `trust_remote_code=True`: `lm-eval --model hf
--model_args pretrained=DIR,trust_remote_code=True`, or `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import re
from pathlib import Path

# Package module -> file name in the exported directory (transformers' remote-code naming).
_MODULES = {
    "config": "configuration_adaponder",
    "modeling": "modeling_adaponder",
    "hf_compat": "hf_compat_adaponder",
    "inference": "inference_adaponder",
    "ponder": "ponder_adaponder",
    "kv": "kv_adaponder",
    "mixture": "mixture_adaponder",
    "accounting": "accounting_adaponder",
    "generation": "generation_adaponder",
    "speculative": "speculative_adaponder",
}
AUTO_MAP = {
    "AutoConfig": "configuration_adaponder.AdaPonderConfig",
    "AutoModelForCausalLM": "modeling_adaponder.AdaPonderForCausalLM",
}
_IMPORT = re.compile(r"\bfrom model\.(\w+) import")


def _relative(match: re.Match) -> str:
    module = match.group(1)
    if module not in _MODULES:
        raise AssertionError(f"model.{module} is imported by the model files but not exported")
    return f"from .{_MODULES[module]} import"


def write_remote_code(output_dir: str | Path) -> dict[str, str]:
    """Copy the model's source files into `output_dir` with relative imports; returns the auto_map."""
    source_dir = Path(__file__).resolve().parent
    for module, exported in _MODULES.items():
        text = (source_dir / f"{module}.py").read_text()
        (Path(output_dir) / f"{exported}.py").write_text(_IMPORT.sub(_relative, text))
    return dict(AUTO_MAP)

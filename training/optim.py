"""AdamW parameter groups: (gates | backbone) x (decay | no decay), and freezing the backbone.

No weight decay on tensors with fewer than 2 dims (biases, LayerNorm weights), as Pythia. Gates and
backbone are separate groups so that the backbone's learning rate can be 0 while only the gates
train (continued pretraining). The optimizer itself is built by DeepSpeed from these groups.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from training.config import OptimizerConfig
from training.engine import full_shape
from training.schedule import StepSettings


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Four named groups covering every trainable parameter exactly once (empty ones dropped)."""
    gate_ids = {id(p) for p in model.gate_parameters()}
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for gates in (True, False):
        for decay in (True, False):
            groups[gates, decay] = {
                "name": f"{'gates' if gates else 'backbone'}.{'decay' if decay else 'no_decay'}",
                "gates": gates,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "params": [],
            }
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        # ZeRO-3 placeholders are 1-D; the logical shape decides.
        groups[id(param) in gate_ids, len(full_shape(param)) >= 2]["params"].append(param)
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)
    return [g for g in groups.values() if g["params"]]


def set_learning_rates(groups: list[dict[str, Any]], settings: StepSettings) -> None:
    for group in groups:
        group["lr"] = settings.gate_lr if group["gates"] else settings.backbone_lr


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Turn the backbone's parameter gradients off (gates-only phase) or back on.

    Called on the engine's module, which DeepSpeed built with every parameter trainable, so its
    gradient hooks exist for all of them (ZeRO-3 registers them at initialize, only for parameters
    that require grad then; they are post-accumulate hooks on the parameters themselves and survive
    the toggle). While frozen, autograd computes no weight gradient for the backbone and its hook never
    fires, so nothing is reduced; ZeRO-3 counts a frozen parameter's gradient as zeros (so the global
    norm and clipping see only the gates) and AdamW at lr 0 leaves it bit-identical. The backbone's
    activations still carry the gates' gradient through the later passes.
    """
    for param in model.backbone_parameters():
        param.requires_grad_(trainable)

"""One rank of the gates-only test (tests/test_gates_only.py), run by torchrun on 2 CPU ranks.

A tiny adaptive model under real ZeRO-3 takes one gates-only step, then one step with everything
training. Every rank sees the same micro-batch, so the averaged gradients equal one rank's, which a
plain PyTorch copy of the model computes as the reference. Rank 0 writes what it saw to argv[1];
argv[2] is "checkpointing" to recompute the layers in backward (activation checkpointing), else "plain".
"""

import json
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from model import AdaPonderForCausalLM
from tests.helpers import tiny
from training import engine as ds
from training.config import OptimizerConfig
from training.optim import param_groups, set_backbone_trainable

DS_CONFIG = {
    "train_batch_size": 4,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
}


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def reference_grads(weights: dict[str, torch.Tensor], batch: torch.Tensor, gates_only: bool) -> dict:
    """Gradients of a plain (non-DeepSpeed) copy on the same batch; None where not computed."""
    model = AdaPonderForCausalLM(tiny(halt_threshold=0.5))
    model.load_state_dict(weights)
    set_backbone_trainable(model, not gates_only)
    model(input_ids=batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def main() -> None:
    ds.init_distributed()
    torch.manual_seed(0)
    model = ds.build_model(lambda: AdaPonderForCausalLM(tiny(halt_threshold=0.5)), DS_CONFIG)
    model.initialize_weights_with(ds.gather_for_write)
    if sys.argv[2] == "checkpointing":
        model.activation_checkpointing_enable()  # recomputed layers must not bring weight gradients back
    # Gates spread around tau = 0.5 (as in tests/helpers.py), so tokens halt after every pass.
    for gate in model.ponder_gates:
        with ds.gather_for_write(list(gate.dense_out.parameters())), torch.no_grad():
            gate.dense_out.weight.normal_(0.0, 2.0)
            gate.dense_out.bias.fill_(0.8)
    engine = ds.Engine(model, param_groups(model, OptimizerConfig(lr=1e-2)), DS_CONFIG)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    reduced: list[str] = []
    optimizer = engine._ds.optimizer
    reduce = optimizer.reduce_ready_partitions_and_remove_grads

    def recording_reduce(param, *args, **kwargs):
        reduced.append(names[id(param)])
        return reduce(param, *args, **kwargs)

    optimizer.reduce_ready_partitions_and_remove_grads = recording_reduce
    batch = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    report = {"steps": []}
    for gates_only in (True, False):
        for group in engine.param_groups:
            group["lr"] = 1e-2 if group["gates"] or not gates_only else 0.0
        set_backbone_trainable(engine.module, not gates_only)
        before = full_weights(engine.module)
        reduced.clear()
        out = engine(input_ids=batch[:, :-1], labels=batch[:, 1:], shift_labels=False)
        engine.backward(out.loss)
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
        expected = reference_grads(before, batch, gates_only)
        engine.step()
        after = full_weights(engine.module)
        trained = [n for n, g in expected.items() if g is not None]
        report["steps"].append(
            {
                "gates_only": gates_only,
                "reduced": sorted(set(reduced)),
                "trained_in_reference": sorted(trained),
                "changed": sorted(n for n in after if not torch.equal(after[n], before[n])),
                "grad_norm": engine.grad_norm(),
                "expected_grad_norm": float(torch.stack([expected[n].norm() for n in trained]).norm()),
                "max_grad_error": max(float((grads[n] - expected[n]).abs().max()) for n in trained),
                "nonzero_gate_grads": sorted(
                    n for n in trained if n.startswith("ponder_gates.") and expected[n].abs().sum() > 0
                ),
                "frozen_grads": sorted(
                    n for n in grads if n not in trained and grads[n] is not None and grads[n].abs().sum() > 0
                ),
                "passes": out.passes.flatten().tolist(),
            }
        )
    if torch.distributed.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()

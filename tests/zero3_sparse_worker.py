"""Test-only: a few ZeRO-3 training steps on 2 ranks, dense or sparse (tests/test_sparse_zero3.py).

Rank 0's tokens all halt after pass 1 (exit_passes = 1), rank 1's run every pass, so the sparse
step calls every module of passes 2..K on rank 0 with empty batches. Every parameter is
partitioned (persistence threshold 0) so that each module call gathers its weights collectively.

    torchrun --nproc_per_node 2 tests/zero3_sparse_worker.py OUT.json   # {"dense": ..., "sparse": ...}
"""

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import AdaPonderForCausalLM  # noqa: E402
from tests.helpers import VOCAB, tiny  # noqa: E402
from training import distributed as dist  # noqa: E402
from training import engine as ds  # noqa: E402
from training.config import plan_batches, read_config  # noqa: E402

STEPS, MICRO_BATCH, SEQ_LEN = 3, 2, 12


def main(out: str) -> None:
    world = dist.setup_environment()
    cfg = read_config(
        None,
        [
            "model.preset=tiny",
            f"seq_len={SEQ_LEN}",
            f"micro_batch_size={MICRO_BATCH}",
            f"global_batch_size={MICRO_BATCH * world}",
            "train_steps=1",
            "precision=fp32",
        ],
    )
    ds_config = ds.load_ds_config(REPO / cfg.deepspeed_config, cfg, plan_batches(cfg, world))
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds.init_distributed()
    results = {mode: train(mode, ds_config) for mode in ("dense", "sparse")}
    if dist.is_main_process():
        Path(out).write_text(json.dumps(results))
    dist.shutdown()


def train(mode: str, ds_config: dict) -> dict:
    """STEPS optimizer steps from the same initial weights; losses, gradient norms and final weights."""
    config = tiny(halt_threshold=0.5)
    torch.manual_seed(0)
    initial = AdaPonderForCausalLM(config).state_dict() if dist.is_main_process() else None
    model = ds.build_model(lambda: AdaPonderForCausalLM(config), ds_config)
    assert ds.is_partitioned(model)
    ds.write_weights(model, initial)
    engine = ds.Engine(model, [{"params": list(model.parameters())}], ds_config)
    engine.train()
    generator = torch.Generator().manual_seed(dist.rank())
    exits = torch.full((MICRO_BATCH, SEQ_LEN), 1 if dist.rank() == 0 else config.num_passes)
    losses, norms, passes = [], [], []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN), generator=generator)
        result = engine(
            input_ids=ids,
            labels=ids,
            ponder_lambda=0.1,
            ponder_k=0.2,
            exit_passes=exits,
            dense=mode == "dense",
        )
        engine.backward(result.loss)
        engine.step()
        losses.append(dist.all_gather_object(float(result.loss.detach())))
        norms.append(engine.grad_norm())
        passes.append(dist.all_gather_object(float(result.mean_passes)))
    with ds.gather_for_write(list(engine.module.parameters())):
        final = {n: p.detach().flatten().tolist() for n, p in engine.module.named_parameters()}
    return {"losses": losses, "grad_norms": norms, "passes": passes, "final": final}


if __name__ == "__main__":
    main(sys.argv[1])

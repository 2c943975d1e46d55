"""Half precision through DeepSpeed on one CPU rank: bf16 with fp32 gradient accumulation, fp16 with
dynamic loss scaling saved and resumed, and torch's (fused) AdamW rather than a JIT-compiled one."""

import contextlib
import types

import deepspeed
import pytest
import torch
from deepspeed.accelerator import get_accelerator

from model import AdaPonderForCausalLM
from training import engine as ds
from training.config import plan_batches, read_config, resolve_path
from training.distributed import free_port
from training.optim import param_groups


@pytest.fixture(scope="module")
def one_rank():
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**env, "MASTER_PORT": str(free_port())}.items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        torch.distributed.destroy_process_group()


def run_config(precision: str, stage: int, *extra: str):
    cfg = read_config(
        None,
        [
            "model.preset=tiny",
            "seq_len=16",
            "micro_batch_size=2",
            "global_batch_size=4",  # two micro-batches accumulate
            "train_steps=4",
            f"precision={precision}",
            f"deepspeed_config=ds_configs/zero{stage}.json",
            *extra,
        ],
    )
    plan = plan_batches(cfg, 1)
    return cfg, ds.load_ds_config(resolve_path(cfg.deepspeed_config, "deepspeed_config"), cfg, plan)


def make_engine(cfg, ds_config) -> ds.Engine:
    torch.manual_seed(0)
    model = ds.build_model(lambda: AdaPonderForCausalLM(cfg.model_config()), ds_config)
    return ds.Engine(model, param_groups(model, cfg.optimizer), ds_config)


def micro_step(engine: ds.Engine, scale: float = 1.0) -> None:
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    out = engine(input_ids=ids[:, :-1], labels=ids[:, 1:])
    engine.backward(out.loss * scale)
    engine.step()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_gradients_in_fp32(one_rank, stage, tmp_path):
    cfg, ds_config = run_config("bf16", stage)
    engine = make_engine(cfg, ds_config)
    # Read back from DeepSpeed's own resolved config, not from our dict.
    assert engine._ds._config.grad_accum_dtype == "fp32"
    assert engine._ds.get_data_types() == (torch.bfloat16, torch.float32)
    assert all(p.dtype == torch.bfloat16 for p in engine.parameters())
    for _ in range(2):  # one optimizer step of two micro-batches
        micro_step(engine)
    assert engine._ds.global_steps == 1
    if stage == 3:
        assert engine._ds.optimizer.grad_partitions_flat_buffer.dtype == torch.float32
    # ZeRO-1 in bf16 with fp32 accumulation is DeepSpeed's BF16_Optimizer, with files of its own:
    # they save, pass the weights-only check, consolidate (export, rank-count change) and resume.
    engine.save(tmp_path, "step1", {})
    weights = ds.consolidated_state_dict(tmp_path, "step1")
    params = dict(engine.module.named_parameters())
    assert weights.keys() >= params.keys()
    with ds.gather_for_write(list(params.values())) if stage == 3 else contextlib.nullcontext():
        for name, param in params.items():  # the fp32 master rounds to the bf16 weight
            assert weights[name].dtype == torch.float32 and weights[name].shape == param.shape, name
            torch.testing.assert_close(weights[name].to(torch.bfloat16), param.data, rtol=0, atol=0)
    make_engine(cfg, ds_config).load(tmp_path, "step1")


def test_gpu_nodes_get_torch_fused_adamw_not_a_jit_compiled_one(monkeypatch):
    """On a GPU node DeepSpeed's default AdamW is FusedAdam, compiled with nvcc on first use."""
    cuda = types.SimpleNamespace(device_name=lambda: "cuda")
    monkeypatch.setattr(ds, "get_accelerator", lambda: cuda)
    _, ds_config = run_config("bf16", 3)
    assert ds_config["optimizer"]["params"]["torch_adam"] is True
    assert ds_config["optimizer"]["params"]["fused"] is True
    # An optimizer offloaded to CPU memory keeps DeepSpeed's CPU Adam (host compiler, no nvcc).
    _, offload = run_config("bf16", 3, "deepspeed_config=ds_configs/zero3_offload.json")
    assert "torch_adam" not in offload["optimizer"]["params"]


def test_deepspeed_builds_torch_fused_adamw_and_steps(one_rank, monkeypatch):
    monkeypatch.setattr(ds, "on_accelerator", lambda: True)  # fused AdamW runs on CPU tensors too
    cfg, ds_config = run_config("fp32", 3)
    engine = make_engine(cfg, ds_config)
    basic = engine._ds.optimizer.optimizer
    assert type(basic) is torch.optim.AdamW and basic.defaults["fused"] is True
    micro_step(engine)
    micro_step(engine)
    assert engine._ds.global_steps == 1 and engine.grad_norm() > 0


def test_fp16_dynamic_loss_scale_is_saved_and_resumed(one_rank, monkeypatch, tmp_path):
    """DeepSpeed refuses fp16 where oneDNN has no fp16 kernels (this CPU); torch runs fp16 on CPU
    regardless, so the check is lifted to train and checkpoint a tiny fp16 ZeRO-3 model."""
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    cfg, ds_config = run_config("fp16", 3)
    engine = make_engine(cfg, ds_config)
    scaler = engine._ds.optimizer.loss_scaler
    assert engine._ds.dynamic_loss_scale() and scaler.cur_scale == 2.0**16
    assert engine._ds.get_data_types() == (torch.float16, torch.float32)
    for _ in range(2):  # two overflowing steps: hysteresis 2, so the second halves the scale
        micro_step(engine, scale=float("inf"))
        micro_step(engine, scale=float("inf"))
    micro_step(engine)
    micro_step(engine)
    assert engine._ds.skipped_steps == 2 and scaler.cur_scale == 2.0**15
    state = {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")}
    engine.save(tmp_path, "step3", {})

    resumed = make_engine(cfg, ds_config)
    assert resumed._ds.optimizer.loss_scaler.cur_scale == 2.0**16
    resumed.load(tmp_path, "step3")  # also passes the weights-only check of every file
    loaded = resumed._ds.optimizer.loss_scaler
    assert {k: getattr(loaded, k) for k in state} == state

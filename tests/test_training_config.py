"""Run config, DeepSpeed JSON filling, schedules and the pre-launch checks (no process group)."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from training import pretrain
from training.config import RunConfig, load_config, plan_batches, read_config
from training.engine import load_ds_config, zero_stage
from training.schedule import Schedules, learning_rate, ponder_weights

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SHIPPED_DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.fixture
def fake_pythia(tmp_path):
    """A PonderLM-2.8B-shaped Hugging Face directory (config only): enough to validate a config."""
    root = tmp_path / "pythia"
    root.mkdir()
    config = {
        "model_type": "gpt_neox",
        "vocab_size": 50304,
        "hidden_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 10240,
        "rotary_pct": 0.25,
        "max_position_embeddings": 2048,
        "use_parallel_residual": True,
        "ponderinglm": True,
        "pondering_steps": 3,
        "scale_embeds": True,
        "mutiply_pondering_steps": True,
    }
    (root / "config.json").write_text(json.dumps(config))
    return str(root)


def data_overrides(train_shards):
    prefix, tokenizer = train_shards
    return [f"data.train_paths=[{prefix}]", f"data.tokenizer={tokenizer}"]


def write_yaml(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def test_config_tree_is_one_dataclass_per_concern():
    cfg = RunConfig()
    assert [type(getattr(cfg, name)).__name__ for name in ("model", "data", "optimizer", "schedule")] == [
        "ModelConfig",
        "DataConfig",
        "OptimizerConfig",
        "ScheduleConfig",
    ]
    assert type(cfg.ponder).__name__ == "PonderConfig"
    assert type(cfg.checkpoint).__name__ == "CheckpointConfig"
    assert type(cfg.logging).__name__ == "LoggingConfig"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_run_configs_validate(path, train_shards, fake_pythia):
    overrides = data_overrides(train_shards)
    if yaml.safe_load(path.read_text())["model"].get("init_from"):
        overrides.append(f"model.init_from={fake_pythia}")
    cfg = load_config(path, overrides)
    plan, ds_config = pretrain.preflight(cfg, world_size=2)
    assert plan.global_batch_size == plan.micro_batch_size * plan.gradient_accumulation_steps * 2
    assert ds_config["train_batch_size"] == cfg.global_batch_size
    assert cfg.model_config().vocab_size >= 512


# Pythia's peak learning rates (docs/method.md; PonderLM's scripts reuse them).
PYTHIA_LR = {"70m": 1e-3, "160m": 6e-4, "410m": 3e-4, "1b": 2.5e-4, "1.4b": 2e-4, "2.8b": 1.6e-4}


@pytest.mark.parametrize("size", PYTHIA_LR)
@pytest.mark.parametrize("continued", [False, True], ids=["scratch", "continued"])
def test_every_preset_has_recipes_that_plan_for_8_and_16_gpus(size, continued, train_shards, fake_pythia):
    path = REPO / "configs" / f"pythia-{size}{'-continued' if continued else ''}.yaml"
    assert "where they come from" in path.read_text()  # each recipe states its sources
    overrides = data_overrides(train_shards) + ([f"model.init_from={fake_pythia}"] if continued else [])
    cfg = load_config(path, overrides)
    assert cfg.optimizer.lr == PYTHIA_LR[size]
    # PonderLM's scripts: weight decay 0.01, except 0.1 at 410M.
    assert cfg.optimizer.weight_decay == (0.1 if size == "410m" else 0.01)
    if continued:
        assert cfg.model.preset is None and cfg.model.overrides["adaptive"] is True
        # From a PonderLM checkpoint (1.4B, 2.8B) the gates train alone first, then the backbone re-warms.
        assert bool(cfg.ponder.gates_only) == bool(cfg.ponder.backbone_warmup) == (size in ("1.4b", "2.8b"))
    else:
        assert cfg.model.preset == f"pythia-{size}" and cfg.global_batch_size == 256
    for world_size in (8, 16):
        plan, ds_config = pretrain.preflight(cfg, world_size)
        tokens = plan.train_steps * plan.tokens_per_step
        # 26B tokens from scratch (the paper); 30B from Pythia (PonderLM's CPT); 12B from PonderLM.
        expected = 12e9 if cfg.ponder.gates_only else 30e9 if continued else 26.2e9
        assert tokens == pytest.approx(expected, rel=0.01)
        assert ds_config[
            "train_micro_batch_size_per_gpu"
        ] * plan.gradient_accumulation_steps * world_size == (cfg.global_batch_size)


@pytest.mark.parametrize("path", SHIPPED_DS_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_shipped_ds_configs_are_filled_from_the_run_config(path, precision, train_shards):
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [*data_overrides(train_shards), f"precision={precision}", "optimizer.grad_clip=0.5"],
    )
    plan = plan_batches(cfg, world_size=2)
    ds = load_ds_config(path, cfg, plan)
    assert zero_stage(ds) in (1, 2, 3)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.micro_batch_size
    assert ds["gradient_accumulation_steps"] == plan.gradient_accumulation_steps
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic
    assert ds["optimizer"]["params"]["lr"] == cfg.optimizer.lr
    assert ds["optimizer"]["params"]["betas"] == list(cfg.optimizer.betas)
    assert "auto" not in json.dumps(ds)
    if "offload" in path.name:
        zero = ds["zero_optimization"]
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


def test_ds_config_contradiction_names_file_and_key(tmp_path, train_shards):
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 3
    bad = tmp_path / "bad_ds.json"
    bad.write_text(json.dumps(ds))
    cfg = load_config(REPO / "configs" / "quickstart.yaml", data_overrides(train_shards))
    with pytest.raises(ValueError, match=r"bad_ds\.json: train_micro_batch_size_per_gpu is 3"):
        load_ds_config(bad, cfg, plan_batches(cfg, 2))


def test_monitors_are_filled_from_the_logging_config(tmp_path, train_shards):
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml", [*data_overrides(train_shards), "logging.csv_monitor=true"]
    )
    ds = load_ds_config(REPO / "ds_configs" / "zero3.json", cfg, plan_batches(cfg, 2))
    assert ds["csv_monitor"] == {"enabled": True, "output_path": f"{cfg.run_dir}/monitor", "job_name": "csv"}
    assert ds["wandb"]["enabled"] is False and ds["tensorboard"]["enabled"] is False
    own_tensorboard = {
        **json.loads((REPO / "ds_configs" / "zero3.json").read_text()),
        "tensorboard": {"enabled": True},
    }
    (tmp_path / "tb.json").write_text(json.dumps(own_tensorboard))
    with pytest.raises(ValueError, match="tensorboard.enabled is True"):
        load_ds_config(tmp_path / "tb.json", cfg, plan_batches(cfg, 2))
    if importlib.util.find_spec("wandb") is None:  # wandb stays optional: asking for it says how to get it
        with pytest.raises(ValueError, match="pip install wandb"):
            load_config(
                REPO / "configs" / "quickstart.yaml",
                [*data_overrides(train_shards), "logging.wandb_project=x"],
            )


def test_unknown_keys_and_bad_values_name_the_field(tmp_path):
    bad = write_yaml(tmp_path / "run.yaml", {"optimizer": {"lr": 1e-3, "betaz": [0.9, 0.9]}})
    with pytest.raises(ValueError, match=r"run\.yaml: unknown config key\(s\) \['optimizer\.betaz'\]"):
        read_config(bad)
    with pytest.raises(ValueError, match=r"optimizer\.lr must be of type float, got 'fast'"):
        read_config(None, ["optimizer.lr=fast"])
    with pytest.raises(ValueError, match=r"unknown config key 'schedule\.warmpu'"):
        read_config(None, ["schedule.warmpu=3"])
    with pytest.raises(ValueError, match=r"'seq_len' has no sub-keys"):
        read_config(None, ["seq_len.x=3"])
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16', 'fp16'\]"):
        read_config(None, ["precision=fp8"])


def test_overrides_parse_yaml_values_and_numbers_in_e_notation():
    cfg = read_config(None, ["optimizer.lr=1e-3", "train_tokens=26e9", "optimizer.betas=[0.9,0.99]"])
    assert cfg.optimizer.lr == 1e-3 and cfg.train_tokens == 26_000_000_000
    assert cfg.optimizer.betas == (0.9, 0.99)


def test_batch_arithmetic_is_checked(train_shards):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", data_overrides(train_shards))
    plan = plan_batches(cfg, world_size=2)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.tokens_per_step) == (8, 1, 16 * 128)
    assert plan_batches(cfg, world_size=1).gradient_accumulation_steps == 2
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size 8 x 4 ranks"):
        plan_batches(cfg, world_size=4)
    bad = load_config(
        REPO / "configs" / "quickstart.yaml", [*data_overrides(train_shards), "gradient_accumulation_steps=3"]
    )
    with pytest.raises(ValueError, match="gradient_accumulation_steps 3 contradicts"):
        plan_batches(bad, world_size=2)


def test_learning_rate_warmup_cosine_floor():
    cfg = read_config(None, ["schedule.warmup=10", "schedule.min_lr_ratio=0.1"]).schedule
    assert learning_rate(cfg, 1.0, 1, 110) == pytest.approx(0.1)
    assert learning_rate(cfg, 1.0, 10, 110) == pytest.approx(1.0)
    assert learning_rate(cfg, 1.0, 60, 110) == pytest.approx(0.55)
    assert learning_rate(cfg, 1.0, 110, 110) == pytest.approx(0.1)
    assert learning_rate(cfg, 1.0, 500, 110) == pytest.approx(0.1)


def test_ponder_schedule_and_gates_only_phase_in_tokens(train_shards):
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            *data_overrides(train_shards),
            "ponder.unit=tokens",
            "ponder.start=4096",
            "ponder.ramp=8192",
            "ponder.gates_only=2048",
            "ponder.loss_weight=0.1",
            "ponder.k_max=0.1",
        ],
    )
    assert ponder_weights(cfg.ponder, 4096) == (0.0, 0.0)
    lam, k = ponder_weights(cfg.ponder, 4096 + 4096)
    assert lam == 0.1 and k == pytest.approx(0.05)
    assert ponder_weights(cfg.ponder, 10**9) == (0.1, pytest.approx(0.1))
    schedules = Schedules(cfg, plan_batches(cfg, 2))  # 2048 tokens per step
    first, second = schedules.at(1, 2048), schedules.at(2, 4096)
    assert first.backbone_lr == 0.0 and first.lr > 0 and first.ponder_lambda == 0.0
    assert second.backbone_lr == second.lr
    assert first.gate_lr == pytest.approx(first.lr * cfg.optimizer.gate_lr_multiplier) and first.gate_lr > 0
    assert math.isclose(schedules.at(100, 100 * 2048).lr, cfg.optimizer.lr * cfg.schedule.min_lr_ratio)


def test_backbone_learning_rate_rewarms_after_the_gates_only_phase(train_shards):
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            *data_overrides(train_shards),
            "ponder.unit=steps",
            "ponder.gates_only=20",
            "ponder.backbone_warmup=8",
        ],
    )
    schedules = Schedules(cfg, plan_batches(cfg, 2))
    steps = {step: schedules.at(step, step * 2048) for step in range(1, 40)}
    assert all(steps[s].gates_only and steps[s].backbone_lr == 0.0 for s in range(1, 21))
    assert all(steps[s].gate_lr == pytest.approx(steps[s].lr * 0.3) for s in steps)  # quickstart: x0.3
    for step in range(21, 29):  # linear from 0 over 8 steps, times the schedule's own lr
        assert not steps[step].gates_only
        assert steps[step].backbone_lr == pytest.approx(steps[step].lr * (step - 20) / 8)
    assert all(steps[s].backbone_lr == steps[s].lr for s in range(28, 40))
    with pytest.raises(ValueError, match="no gates"):
        load_config(
            REPO / "configs" / "quickstart.yaml",
            [*data_overrides(train_shards), "ponder.gates_only=20", "model.overrides.adaptive=false"],
        )
    jump = load_config(
        REPO / "configs" / "quickstart.yaml", [*data_overrides(train_shards), "ponder.gates_only=20"]
    )
    after = Schedules(jump, plan_batches(jump, 2)).at(21, 21 * 2048)
    assert after.backbone_lr == after.lr > 0  # backbone_warmup 0: the old jump, still available


def test_failures_before_training_have_clear_messages(tmp_path, train_shards, monkeypatch, capsys):
    # A single-process environment, so that main() does not invent one (and leaves os.environ alone).
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    data = data_overrides(train_shards)

    def fails(*argv):
        assert pretrain.main(["--config", *argv]) == 2
        return capsys.readouterr().err

    tree = yaml.safe_load(Path(quickstart).read_text())
    bad = write_yaml(tmp_path / "bad.yaml", {**tree, "sequence_len": 8})
    assert "bad.yaml: unknown config key(s) ['sequence_len']" in fails(str(bad), *data)
    assert "unknown config key 'logging.interval'" in fails(quickstart, *data, "logging.interval=3")
    missing = fails(quickstart, *data, f"data.train_paths=[{tmp_path}/nothing]")
    assert f"data.train_paths: {tmp_path}/nothing.bin does not exist" in missing
    mismatch = fails(quickstart, *data, "model.overrides.vocab_size=256")
    assert "has 512 tokens but the model's vocab_size is 256" in mismatch
    assert "not a multiple" in fails(quickstart, *data, "global_batch_size=12")


def test_slurm_tasks_map_to_torch_distributed_ranks(monkeypatch):
    from training.distributed import setup_environment

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        # setenv first so that monkeypatch restores the variable's absence too: setup_environment
        # writes os.environ, and a LOCAL_RANK=1 left behind makes lm-eval return no results later.
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MASTER_ADDR", "node-1")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert setup_environment() == 8
    assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")] == [
        "5",
        "1",
        "8",
        "node-1",
    ]


def test_every_launch_of_a_run_logs_to_the_same_wandb_run(tmp_path):
    from training.metrics import wandb_resume_environment

    first, again = wandb_resume_environment(tmp_path / "run"), wandb_resume_environment(tmp_path / "run")
    assert first == again and first["WANDB_RESUME"] == "allow"
    assert wandb_resume_environment(tmp_path / "other")["WANDB_RUN_ID"] != first["WANDB_RUN_ID"]


def test_the_logging_interval_carried_by_a_checkpoint_survives_another_rank_count():
    import torch

    from training.metrics import TrainMeter

    def saved(seed: int) -> dict:
        meter = TrainMeter(4, torch.device("cpu"), num_gates=3)
        state = meter.state_dict()
        state["sums"] = [float(seed + i) for i in range(len(state["sums"]))]
        state["gates"] = [[float(seed * j) for j in range(len(row))] for row in state["gates"]]
        return state | {"grad_norm": 0.25}

    states = [saved(1), saved(10)]

    def loaded(rank: int, world_size: int) -> dict:
        meter = TrainMeter(4, torch.device("cpu"), num_gates=3)
        meter.load_state_dict(states, rank, world_size)
        return meter.state_dict()

    assert loaded(1, 2) == states[1]  # same rank count: each rank its own
    merged = loaded(0, 1)  # fewer ranks: rank 0 holds the sum, which is what logging all-reduces
    assert merged["sums"] == [a + b for a, b in zip(states[0]["sums"], states[1]["sums"])]
    assert merged["gates"][2] == [a + b for a, b in zip(states[0]["gates"][2], states[1]["gates"][2])]
    assert set(loaded(2, 3)["sums"]) == {0.0} and loaded(2, 3)["grad_norm"] == 0.25
    # The carried tokens count in the interval's means, not in this process's throughput.
    meter = TrainMeter(4, torch.device("cpu"), num_gates=3)
    meter.load_state_dict(states, 0, 1)
    assert meter.reduce()["tokens_per_sec"] == 0.0

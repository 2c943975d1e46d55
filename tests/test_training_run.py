"""End-to-end training with real DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), tiny model, real text.

One reference run of 8 steps (checkpoints at 4 and 8) is compared against runs that stop and
resume, are killed, change the number of ranks or the accumulation. fp32 and dropout-free, so
resumed runs must match bit for bit.
"""

import csv
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from helpers import (
    GLOBAL_BATCH,
    PRETRAIN,
    REPO,
    STEPS,
    command,
    environment,
    make_config,
    run_dir,
    summary,
    train,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.checkpoint import latest_tag, tag_for
from training.engine import consolidated_optimizer_state, consolidated_state_dict
from training.metrics import EVAL_SCALARS, TRAIN_SCALARS


def scalars(run: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the run's TensorBoard events; a step logged again after a restart wins."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(run / "checkpoints", tag_for(step))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_shards):
    """8 uninterrupted steps through the `deepspeed` launcher, with DeepSpeed's CSV monitor on."""
    tmp = tmp_path_factory.mktemp("reference")
    config = make_config(tmp, train_shards, "reference")
    result = train(config, "logging.csv_monitor=true", launcher="deepspeed")
    # torch's deprecation of the collective ZeRO-3 calls, repeated on every call, was most of a log.
    assert "reduce_scatter_tensor` is deprecated" not in result.stdout + result.stderr
    return run_dir(config)


def test_loss_falls_on_real_text(reference):
    logged = scalars(reference)
    assert sorted(logged["train/lm_loss"]) == list(range(1, STEPS + 1))
    assert logged["eval/lm_loss"][8] < logged["eval/lm_loss"][4] < logged["train/lm_loss"][1] - 0.1
    result = summary(reference)
    assert result["status"] == "finished" and result["consumed_samples"] == STEPS * GLOBAL_BATCH
    assert result["last_loss"] < result["first_loss"]


def test_tensorboard_holds_the_training_and_eval_scalars(reference):
    logged = scalars(reference)
    expected = {
        *TRAIN_SCALARS,
        *EVAL_SCALARS,
        *(f"ponder/halted_after_pass_{j}" for j in range(1, 5)),
        "eval/nll_by_passes/4",
        "eval/token_fraction_by_passes/1",
    }
    assert expected <= set(logged)
    assert logged["train/consumed_tokens"][STEPS] == STEPS * GLOBAL_BATCH * 32
    assert logged["train/ponder_lambda"][4] == 0.0 and logged["train/ponder_lambda"][5] > 0.0
    assert 1.0 <= logged["ponder/mean_passes"][STEPS] <= 4.0
    assert logged["perf/mfu"][STEPS] > 0 and logged["perf/tokens_per_sec"][STEPS] > 0
    assert sum(logged[f"ponder/halted_after_pass_{j}"][STEPS] for j in range(1, 5)) == pytest.approx(1.0)
    events = EventAccumulator(str(reference / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert "ponder/passes_per_token" in events.Tags()["histograms"]


def histograms(run: Path) -> dict[str, dict[int, Any]]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    return {
        tag: {e.step: e.histogram_value for e in events.Histograms(tag)}
        for tag in events.Tags()["histograms"]
    }


def documented_tags() -> list[re.Pattern]:
    """The tags of docs/metrics.md's table, `{j}` / `{u}` standing for numbers."""
    rows = re.findall(
        r"^\| `([a-z_/{}0-9]+)` \| (?:scalar|histogram) \|", (REPO / "docs" / "metrics.md").read_text(), re.M
    )
    return [re.compile(re.sub(r"\\\{[ju]\\\}", r"[0-9]+", re.escape(row)) + "$") for row in rows]


def test_every_logged_tag_is_documented_and_every_documented_tag_logged(reference):
    logged = set(scalars(reference)) | set(histograms(reference))
    patterns = documented_tags()
    assert len(patterns) > 20
    assert [tag for tag in logged if not any(p.match(tag) for p in patterns)] == []
    # lr_backbone is logged only with a gates-only phase (test_continued_pretraining...).
    unused = [p.pattern for p in patterns if not any(p.match(tag) for tag in logged)]
    assert unused == ["train/lr_backbone$"]


def test_gate_histograms_and_halting_fractions_are_written_at_every_logged_step(reference):
    logged, hists = scalars(reference), histograms(reference)
    tokens = GLOBAL_BATCH * 32
    for u in range(3):
        gate = hists[f"ponder/gate_values/{u}"]
        assert sorted(gate) == sorted(logged["train/lm_loss"]) == list(range(1, STEPS + 1))
        for step, h in gate.items():
            ran_pass_u = 1 - sum(logged[f"ponder/halted_after_pass_{j}"][step] for j in range(1, u + 1))
            assert h.num == pytest.approx(tokens * ran_pass_u)  # one value per token that ran pass u
            assert sum(h.bucket) == h.num and 0.0 <= h.min <= h.sum / h.num <= h.max <= 1.0
    # Gates start near sigmoid(4) = 0.98: step 1's values lie in the top buckets.
    first = hists["ponder/gate_values/0"][1]
    assert first.min >= 0.9 and first.sum / first.num > 0.95


def test_csv_monitor_holds_the_same_scalars_as_tensorboard(reference):
    logged = scalars(reference)
    folder = reference / "monitor" / "csv"
    for tag in ("train/lm_loss", "train/grad_norm", "ponder/halted_after_pass_4", "eval/lm_loss"):
        with open(folder / (tag.replace("/", "_") + ".csv")) as f:
            rows = [row for row in csv.reader(f) if row[0] != "step"]
        assert {int(step): float(value) for step, value in rows} == pytest.approx(logged[tag], rel=1e-6)
    assert not (folder / "Train_Samples_lr.csv").exists()  # DeepSpeed's own event (group 0's lr) is off


def test_zero3_holds_about_half_the_parameters_per_rank(reference):
    counts = summary(reference)["parameters"]
    assert len(counts["per_rank"]) == 2
    for held in counts["per_rank"]:
        assert 0.45 * counts["total"] < held < 0.6 * counts["total"]


def test_checkpoints_latest_and_keep_last(reference):
    checkpoints = reference / "checkpoints"
    assert latest_tag(checkpoints) == tag_for(STEPS)
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [tag_for(4), tag_for(8)]
    state = json.loads((checkpoints / tag_for(STEPS) / "train_state.json").read_text())
    assert state["step"] == STEPS and state["sampler"]["consumed_samples"] == STEPS * GLOBAL_BATCH
    assert state["provenance"]["init"] == "random" and state["config"]["seq_len"] == 32


def test_stop_and_resume_equals_uninterrupted(tmp_path, train_shards, reference):
    config = make_config(tmp_path, train_shards, "resumed")
    first = train(config, "exit_at_step=4")
    assert "stopped at exit_at_step=4" in first.stdout
    second = train(config)
    assert "resumed from" in second.stdout and "(full state) at step 4" in second.stdout
    run = run_dir(config)
    assert scalars(run)["train/lm_loss"] == scalars(reference)["train/lm_loss"]
    assert_same_weights(weights(run, STEPS), weights(reference, STEPS))


# Opt-in: test_stop_and_resume_equals_uninterrupted resumes the same way at a logged step.
@pytest.mark.optin
def test_a_stop_between_logged_steps_resumes_the_logged_interval(tmp_path, train_shards, reference):
    # Logged every 3 steps, stopped at step 5 (between checkpoints 4 and 8, as a SIGTERM stops a run):
    # the interval of steps 4-6 spans the stop. The checkpoint carries steps 4 and 5's sums, so step 6
    # logs the mean of steps 4, 5 and 6, not of step 6 alone; the weights are the uninterrupted run's.
    config = make_config(tmp_path, train_shards, "interval", logging__log_interval=3)
    train(config, "exit_at_step=5")
    train(config)
    run = run_dir(config)
    assert_same_weights(weights(run, STEPS), weights(reference, STEPS))
    logged, every_step = scalars(run), scalars(reference)
    for tag in ("train/lm_loss", "ponder/mean_passes", "train/ponder_loss"):
        assert sorted(logged[tag]) == [3, 6, 8]
        for step, steps in ((3, (1, 2, 3)), (6, (4, 5, 6)), (8, (7, 8))):
            expected = sum(every_step[tag][s] for s in steps) / len(steps)
            assert abs(logged[tag][step] - expected) <= 1e-6 * max(1.0, abs(expected)), (tag, step)
    assert 0 < logged["perf/tokens_per_sec"][6] < float("inf")


# Opt-in: tests/test_multinode.py kills a run between checkpoints and resumes it the same way.
@pytest.mark.optin
def test_sigkill_between_checkpoints_resumes_from_the_last_complete_one(tmp_path, train_shards, reference):
    config = make_config(tmp_path, train_shards, "killed")
    proc = subprocess.Popen(
        command(config), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    for line in proc.stdout:
        if line.startswith("step 5/"):  # checkpoint 4 is complete, checkpoint 8 is 3 steps away
            # torchrun's workers live in their own process group: kill the whole tree at once.
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for process in tree:
                process.kill()
            psutil.wait_procs(tree, timeout=60)
            break
    proc.wait(timeout=60)
    run = run_dir(config)
    assert latest_tag(run / "checkpoints") == tag_for(4)
    resumed = train(config)
    assert "at step 4, consumed samples 32" in resumed.stdout
    result = summary(run)
    assert (result["step"], result["consumed_samples"]) == (STEPS, STEPS * GLOBAL_BATCH)
    logged, expected = scalars(run)["train/lm_loss"], scalars(reference)["train/lm_loss"]
    assert {s: logged[s] for s in range(5, 9)} == {s: expected[s] for s in range(5, 9)}
    assert_same_weights(weights(run, STEPS), weights(reference, STEPS))


def copy_checkpoint(source: Path, step: int, run: Path) -> None:
    """Start `run` with checkpoint `step` of `source` as its only one."""
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag_for(step), run / "checkpoints" / tag_for(step))
    (run / "checkpoints" / "latest").write_text(tag_for(step))


def assert_same_moments(run: Path, other: Path, step: int, atol: float = 1e-7) -> None:
    (moments, adam_step), (expected, expected_step) = (
        consolidated_optimizer_state(r / "checkpoints", tag_for(step)) for r in (run, other)
    )
    assert adam_step == expected_step == step and moments.keys() == expected.keys()
    for name in moments:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[name][key], expected[name][key], rtol=0, atol=atol, msg=name)


def test_another_number_of_ranks_keeps_adam_moments_step_counts_and_data_position(
    tmp_path, train_shards, reference
):
    # 2 ranks -> 1 from the reference's step 4, checkpoints at 6 and 8; then 1 -> 2 from step 6.
    config = make_config(tmp_path, train_shards, "one_rank", checkpoint__interval=2)
    one = run_dir(config)
    copy_checkpoint(reference, 4, one)
    resumed = train(config, nproc=1)
    assert "(rank count changed: weights, Adam moments and step counts) at step 4" in resumed.stdout
    assert "micro 4 x accumulation 2 x 1 ranks" in resumed.stdout
    result = summary(one)
    assert (result["step"], result["consumed_samples"]) == (STEPS, STEPS * GLOBAL_BATCH)
    config = make_config(tmp_path, train_shards, "two_ranks_again")
    two = run_dir(config)
    copy_checkpoint(one, 6, two)
    assert "(rank count changed: weights, Adam moments and step counts) at step 6" in train(config).stdout
    # With the moments reset, Adam's first step would move every weight by ~lr and the losses would
    # part after one step. fp32; 1 and 2 ranks sum the same 8 samples in different orders.
    expected = scalars(reference)["train/lm_loss"]
    for run, first in ((one, 5), (two, 7)):
        logged = scalars(run)["train/lm_loss"]
        assert sorted(logged) == list(range(first, STEPS + 1))
        for step in range(first, STEPS + 1):
            assert logged[step] == pytest.approx(expected[step], rel=1e-5)
        assert_same_weights(weights(run, STEPS), weights(reference, STEPS), atol=1e-6)
        assert_same_moments(run, reference, STEPS)


def test_gradient_accumulation_4x1_equals_1x4(tmp_path, train_shards, reference):
    # With activation checkpointing on as well: recomputing layers must not change the numbers.
    config = make_config(
        tmp_path, train_shards, "accumulated", micro_batch_size=1, activation_checkpointing=True
    )
    result = train(config, "exit_at_step=4")
    assert "micro 1 x accumulation 4 x 2 ranks" in result.stdout
    run = run_dir(config)
    logged, expected = scalars(run)["train/lm_loss"], scalars(reference)["train/lm_loss"]
    for step in range(1, 5):
        assert logged[step] == pytest.approx(expected[step], rel=1e-5)
    accumulated, whole = weights(run, 4), weights(reference, 4)
    # Softmax ignores a bias on the keys: its true gradient is 0 and Adam scales the rounding noise
    # of the two summation orders up to ~lr-sized steps. Compare those entries loosely.
    for name in [n for n in whole if n.endswith("query_key_value.bias")]:
        heads_qkv = accumulated.pop(name).view(4, 3, -1), whole.pop(name).view(4, 3, -1)  # [heads, q|k|v, H]
        torch.testing.assert_close(*(t[:, [0, 2]] for t in heads_qkv), rtol=0, atol=1e-5)
        torch.testing.assert_close(*(t[:, 1] for t in heads_qkv), rtol=0, atol=1e-3)
    # Elsewhere the two orders agree to ~2e-6; an entry whose gradient is mostly rounding noise can
    # still move ~1e-5 under Adam (seen once in 4096 of layers.0.attention.dense.weight).
    assert_same_weights(accumulated, whole, atol=5e-5)


def test_sigusr1_finishes_the_step_checkpoints_and_exits_0(tmp_path, train_shards):
    config = make_config(tmp_path, train_shards, "preempted", train_steps=200)
    proc = subprocess.Popen(
        command(config), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    for line in proc.stdout:
        if line.startswith("step 3/"):
            # torchrun's children are the ranks (their own children are data-loader workers).
            workers = [p for p in psutil.Process(proc.pid).children() if str(PRETRAIN) in p.cmdline()]
            assert len(workers) == 2
            for worker in workers:
                worker.send_signal(signal.SIGUSR1)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    result = summary(run_dir(config))
    assert result["status"] == "stopped by signal (SIGUSR1)"
    assert 3 <= result["step"] < 200 and result["consumed_samples"] == result["step"] * GLOBAL_BATCH
    assert latest_tag(run_dir(config) / "checkpoints") == tag_for(result["step"])


def test_nan_loss_is_reported_and_the_last_checkpoint_kept(tmp_path, train_shards):
    # An absurd learning rate: step 1 is fine, its update overflows, step 2's loss is NaN.
    config = make_config(
        tmp_path,
        train_shards,
        "diverged",
        checkpoint__interval=1,
        logging__eval_interval=0,
        optimizer__lr=1e30,
    )
    result = train(config, nproc=1, expect=1)
    assert "non-finite loss at step 2" in result.stderr
    assert "consumed_samples=8, this step's samples [8, 16)" in result.stderr
    run = run_dir(config)
    assert latest_tag(run / "checkpoints") == tag_for(1)
    assert all(torch.isfinite(t).all() for t in weights(run, 1).values())


def tiny_pythia(root: Path, **config_fields):
    """A randomly initialised 2-layer Pythia-shaped checkpoint directory (HF format)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    pythia = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            rotary_pct=0.25,
            max_position_embeddings=256,
            **config_fields,
        )
    )
    pythia.save_pretrained(root)
    state = pythia.state_dict()
    state["embed_out.weight"] = state.pop("lm_head.weight", state.get("embed_out.weight"))
    return state


def test_continued_pretraining_trains_the_gates_alone_then_rewarms_the_backbone(tmp_path, train_shards):
    original = tiny_pythia(tmp_path / "pythia")
    config = make_config(
        tmp_path,
        train_shards,
        "continued",
        model={"init_from": str(tmp_path / "pythia")},
        ponder={"gates_only": 2, "backbone_warmup": 2},
        train_steps=4,
        checkpoint__interval=2,
        logging__eval_interval=4,
    )
    config_tree = yaml.safe_load(config.read_text())
    config_tree["data"]["start_sample"] = 40  # a fresh run that starts further on in the data
    config.write_text(yaml.safe_dump(config_tree))
    result = train(config, "exit_at_step=2")  # stops as the gates-only phase ends
    assert "evaluating" in result.stdout and "as loaded (step 0)" in result.stdout
    initial_eval = summary(run_dir(config))["initial_eval"]
    assert initial_eval["lm_loss"] > 0
    resumed = train(config)
    assert "(full state) at step 2" in resumed.stdout and "as loaded (step 0)" not in resumed.stdout
    run = run_dir(config)
    state = json.loads((run / "checkpoints" / tag_for(2) / "train_state.json").read_text())
    assert state["sampler"]["start_sample"] == 40 and state["consumed_samples"] == 2 * GLOBAL_BATCH
    assert state["provenance"]["init_from"] == str((tmp_path / "pythia").resolve())
    saved = (tmp_path / "pythia" / "model.safetensors").read_bytes()
    assert state["provenance"]["sha256"]["model.safetensors"] == hashlib.sha256(saved).hexdigest()
    assert "config.json" in state["provenance"]["sha256"]

    def backbone(step):
        return {n: t for n, t in weights(run, step).items() if not n.startswith("ponder_gates.")}

    assert_same_weights(backbone(2), {name: original[name] for name in backbone(2)})
    changed = [n for n, t in backbone(4).items() if not torch.equal(t, original[n])]
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in changed
    logged = scalars(run)
    assert [logged["train/lr_backbone"][s] for s in (1, 2)] == [0.0, 0.0]
    assert logged["train/lr_backbone"][3] == pytest.approx(logged["train/lr"][3] / 2)  # half-way re-warmed
    assert logged["train/lr_backbone"][4] == pytest.approx(logged["train/lr"][4])
    assert all(logged["train/lr_gates"][s] > 0 for s in range(1, 5))
    # The step-0 evaluation belongs to the first launch: the resumed one neither repeats it nor drops
    # it from the run's record.
    assert sorted(logged["eval/lm_loss"]) == [0, 4] and summary(run)["initial_eval"] == initial_eval


# Opt-in: test_continued_pretraining_trains_the_gates_alone_then_rewarms_the_backbone evaluates the
# loaded weights at step 0 too.
@pytest.mark.optin
def test_first_evaluation_is_the_loaded_checkpoints_own_validation_loss(tmp_path, train_shards):
    from data import build_datasets
    from data.config import DataConfig
    from model import AdaPonderForCausalLM

    # A PonderLM checkpoint: 4 passes with its own embedding scale, no gates.
    ponderlm = {
        "ponderinglm": True,
        "pondering_steps": 3,
        "scale_embeds": True,
        "mutiply_pondering_steps": True,
    }
    tiny_pythia(tmp_path / "ponderlm", **ponderlm)
    config = make_config(
        tmp_path,
        train_shards,
        "from_ponderlm",
        model={"init_from": str(tmp_path / "ponderlm")},
        train_steps=1,
        checkpoint__interval=0,
        logging__eval_interval=1,
    )
    train(config)
    logged = scalars(run_dir(config))["eval/lm_loss"]
    prefix, _ = train_shards
    valid = build_datasets(DataConfig(train_paths=[prefix], split="95,5,0"), 32, {"valid": 8})["valid"]
    tokens = torch.stack([torch.from_numpy(valid[i]) for i in range(8)])
    model = AdaPonderForCausalLM.from_pythia(str(tmp_path / "ponderlm")).eval()
    assert (model.config.num_passes, model.config.scale_embeds, model.config.adaptive) == (4, True, False)
    with torch.no_grad():
        expected = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:], shift_labels=False).lm_loss
    assert logged[0] == pytest.approx(float(expected), rel=1e-5)
    assert 1 in logged


def test_export_loads_with_transformers_remote_code_without_this_package(reference, tmp_path):
    from model import AdaPonderConfig, AdaPonderForCausalLM
    from training.export import main as export_main

    out = tmp_path / "hf"
    assert export_main([str(reference), str(out)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "modeling_adaponder.py"} <= {
        p.name for p in out.iterdir()
    }
    final = weights(reference, STEPS)
    config = AdaPonderConfig(**json.loads((out / "config.json").read_text()))
    expected_model = AdaPonderForCausalLM(config)
    expected_model.load_state_dict(final, strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = expected_model.eval()(ids).logits
    # A fresh interpreter that never imports this repository's packages: what lm-eval does.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "assert 'model' not in sys.modules and 'training' not in sys.modules\n"
        f"AutoTokenizer.from_pretrained({str(out)!r})('def f(): pass')\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in environment().items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


def test_export_rejects_a_directory_without_checkpoints(tmp_path, capsys):
    from training.export import main as export_main

    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "latest" in capsys.readouterr().err

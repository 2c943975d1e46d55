"""The training loop: optimizer steps, validation, checkpoints, signals and non-finite losses.

Loss convention: each micro-batch's loss is the mean cross-entropy over its tokens (all micro-batches
hold micro_batch_size x seq_len targets) plus lambda x the bottom-k gate loss *of that micro-batch*.
DeepSpeed divides each micro-batch's gradient by the accumulation steps and averages over ranks, so
the step's gradient is that of the mean over the global batch (exact for the LM term; the bottom-k
term is a mean of per-micro-batch bottom-k values).

Under ZeRO-3 every rank must run the same modules the same number of times: the model runs densely
(all K passes for every token; halting is applied with `where`), in training and in validation.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data import build_datasets
from data.loader import build_dataloader
from data.sampler import PretrainingSampler
from model import AdaPonderConfig, AdaPonderForCausalLM
from model.hf_compat import load_checkpoint_state_dict, match_state_dict
from training import checkpoint
from training import distributed as dist
from training import engine as ds
from training.config import BatchPlan, RunConfig, config_to_dict, dump_config
from training.metrics import (
    EvalMeter,
    MetricsWriter,
    TrainMeter,
    detect_peak_tflops,
    wandb_resume_environment,
)
from training.optim import param_groups, set_backbone_trainable, set_learning_rates
from training.rank_status import RankStatus
from training.rundir import RunLock, write_durable
from training.schedule import Schedules, StepSettings

CLIENT_STATE_SCHEMA = 1
# The fields that define the model: AdaPonderConfig's own constructor arguments.
_ARCHITECTURE_KEYS = [
    name
    for name, p in inspect.signature(AdaPonderConfig.__init__).parameters.items()
    if name != "self" and p.kind is not p.VAR_KEYWORD
]


class NonFiniteLossError(RuntimeError):
    """A NaN or inf loss; raised on every rank before the optimizer step that would apply it."""


@dataclass
class TrainState:
    """Counters of the run, saved in every checkpoint (the config itself never changes)."""

    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0  # position in the training data, over all ranks
    consumed_tokens: int = 0


def lock_run_dir(run_dir: Path) -> RunLock | None:
    """Rank 0 takes the run directory's lock (held while the returned object lives); a second
    launch stops on every rank, before it writes anything into the directory."""
    lock, error = None, None
    if dist.is_main_process():
        try:
            lock = RunLock(run_dir)
        except ValueError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise ValueError(error)
    return lock


class DeferredSignals:
    """SIGTERM and SIGUSR1 (a scheduler's preemption notice) noted, never acted on where they land:
    installed at launch, so that one arriving during the minutes of initialisation is not fatal but
    stops the run at its first step boundary, checkpointed, like one arriving during training."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_PER_LAUNCH = {"exit_at_step"}  # settings of one launch, expected to differ between resumes


def _config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf of two nested config dicts that differs."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if name in _PER_LAUNCH:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            differences += _config_differences(old, new, f"{name}.")
        elif old != new:
            differences.append(f"{name}: {old!r} -> {new!r}")
    return differences


class Trainer:
    """Builds data, model and engine for one run (resuming when the run holds a checkpoint) and trains."""

    def __init__(
        self,
        cfg: RunConfig,
        plan: BatchPlan,
        ds_config: dict[str, Any],
        status: RankStatus,
        signals: DeferredSignals | None = None,
    ):
        self.cfg, self.plan, self.ds_config = cfg, plan, ds_config
        self.signals = signals  # a stop asked for since the launch (else from train() on)
        self.status = status  # this rank's phase and memory, for the other ranks' failure reports
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.device = ds.device()
        self.state = TrainState()
        self.model_config = cfg.model_config()
        self._seed_everything()
        resume_tag, resume_state = self._find_resume_point()
        self.datasets = self._build_datasets()
        model = ds.build_model(lambda: AdaPonderForCausalLM(self.model_config), ds_config)
        same_world = resume_state is not None and resume_state["world_size"] == plan.data_parallel_size
        self.provenance = self._initial_weights(model, resume_tag, resume_state, same_world)
        if cfg.activation_checkpointing:
            model.activation_checkpointing_enable()
        if cfg.logging.wandb_project is not None:
            for name, value in wandb_resume_environment(self.run_dir).items():
                os.environ.setdefault(name, value)  # a user's own WANDB_* settings win
        self.engine = ds.Engine(model, param_groups(model, cfg.optimizer), ds_config)
        self._backbone_trainable = True  # the engine is built with everything trainable (optim.py)
        client = None
        if resume_state is not None:
            client = self.engine.load(self.checkpoint_dir, resume_tag) if same_world else resume_state
            self._restore(client, restore_rng=same_world)
        self.moments_restored = same_world or (resume_state is not None and self._restore_moments(resume_tag))

        self.sampler = PretrainingSampler(
            num_samples=plan.train_steps * plan.global_batch_size,
            consumed_samples=self.state.consumed_samples,
            micro_batch_size=plan.micro_batch_size,
            data_parallel_rank=dist.rank(),
            data_parallel_size=plan.data_parallel_size,
            fingerprint=self.datasets["train"].fingerprint,
            start_sample=cfg.data.first_sample(),
            order_fingerprint=self.datasets["train"].order_fingerprint,
        )
        if client is not None:
            self.sampler.load_state_dict(client["sampler"], allow_data_change=cfg.data.allow_data_change)
        if resume_tag is not None:
            checkpoint.apply_choice(self.checkpoint_dir, self._choice)
            dist.barrier()
        self._write_resolved_config()  # only once the resume is accepted: it describes the checkpoints
        self.schedules = Schedules(cfg, plan)
        mc = self.model_config
        num_gates = mc.num_passes - 1 if mc.adaptive else 0
        self.meter = TrainMeter(
            mc.num_passes, self.device, num_gates, mc.halt_threshold, sparse=cfg.ponder.sparse_training
        )
        if client is not None and "meter" in client:  # checkpoints from before it was saved lack it
            self.meter.load_state_dict(client["meter"], dist.rank(), plan.data_parallel_size)
        self.peak_flops = detect_peak_tflops(cfg.precision, cfg.logging.peak_tflops)
        self.writer = MetricsWriter(
            self.run_dir / "tensorboard",
            plan.train_steps,
            self.state.step,
            cfg.logging.progress_bar,
            monitor=self.engine.write_events,
        )
        # The run's record across launches (saved in every checkpoint, so a resumed launch's summary
        # still starts from the run's first logged loss and keeps its step-0 evaluation).
        self._first_loss: float | None = None
        self._last_train: dict[str, Any] = {}
        self._last_eval: dict[str, Any] | None = None
        self._initial_eval: dict[str, Any] | None = None
        if client is not None and "record" in client:  # checkpoints from before it was saved lack it
            self._restore_record(client["record"])
        self._log_start(resume_tag, same_world)

    # ----------------------------------------------------------------------------------------------
    # Setup.

    def _seed_everything(self) -> None:
        # Same seed on every rank: ZeRO-3 initialises on rank 0 and broadcasts; nothing else is random.
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)

    def _write_resolved_config(self) -> None:
        if dist.is_main_process():
            write_durable(self.run_dir / "config.yaml", dump_config(self.cfg))

    def _find_resume_point(self) -> tuple[str | None, dict[str, Any] | None]:
        """The run's newest complete checkpoint (`checkpoint.choose_checkpoint`), checked against this
        run's model; nothing on disk changes before the checks pass."""
        choice = checkpoint.choose_checkpoint(self.checkpoint_dir)
        if choice.tag is None:
            return None, None
        tag = choice.tag
        state = checkpoint.read_train_state(self.checkpoint_dir, tag)
        if state.get("schema") != CLIENT_STATE_SCHEMA:
            raise ValueError(f"{self.checkpoint_dir / tag}: unknown checkpoint schema {state.get('schema')}")
        saved, current = state["model_config"], json.loads(self.model_config.to_json_string())
        differing = sorted(k for k in _ARCHITECTURE_KEYS if saved.get(k) != current.get(k))
        if differing:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
            raise ValueError(
                f"{self.checkpoint_dir / tag}: the model config differs from the checkpoint's ({details}); "
                "use a new run_dir to train a different model"
            )
        self._check_resume_settings(tag, state)
        for message in choice.messages:
            dist.print0(f"WARNING: {message}")
        self._choice = choice  # applied (directories moved aside, `latest`) once every check passed
        return tag, state

    def _check_resume_settings(self, tag: str, state: dict[str, Any]) -> None:
        """Refuse what a checkpoint cannot resume under (another ZeRO stage or precision, an
        exit_at_step already passed); name every other setting that changed since it was saved."""
        where = self.checkpoint_dir / tag
        saved_config = state.get("config", {})
        now = {"ZeRO stage": ds.zero_stage(self.ds_config), "precision": self.cfg.precision}
        saved = {
            "ZeRO stage": state.get("zero_stage"),
            "precision": state.get("precision", saved_config.get("precision")),
        }
        changed = [f"{k} {saved[k]} (this launch: {now[k]})" for k in now if saved[k] not in (None, now[k])]
        # On as many ranks as it was saved with, DeepSpeed loads the shards as written; on another
        # number, the weights and Adam moments are rebuilt (_initial_weights), whatever the layout.
        if changed and state.get("world_size") == self.plan.data_parallel_size:
            raise ValueError(
                f"{where} was saved with {' and '.join(changed)}; on the same number of ranks its "
                "optimizer shards load only as they were written: resume with the deepspeed_config stage "
                "and precision it was saved with (or on another number of ranks, which rebuilds the state "
                "from the consolidated weights)"
            )
        step = int(state["step"])
        if self.cfg.exit_at_step is not None and self.cfg.exit_at_step <= step:
            raise ValueError(
                f"exit_at_step={self.cfg.exit_at_step}: the run is already at step {step} ({where}); "
                "raise exit_at_step or drop it"
            )
        differences = _config_differences(saved_config, config_to_dict(self.cfg))
        if differences:
            dist.print0(
                f"WARNING: resuming from {where} with settings changed since it was saved: "
                + "; ".join(differences)
                + " (config.yaml is rewritten with the new settings)"
            )

    def _build_datasets(self) -> dict[str, Any]:
        eval_on = self.cfg.logging.eval_interval > 0 and self.cfg.logging.eval_samples > 0
        datasets = build_datasets(
            self.cfg.data,
            self.cfg.seq_len,
            {
                "train": self.cfg.data.first_sample() + self.plan.train_steps * self.plan.global_batch_size,
                "valid": self.cfg.logging.eval_samples if eval_on else 0,
            },
            vocab_size=self.model_config.vocab_size,
        )
        if eval_on and datasets["valid"] is None:
            raise ValueError(
                "logging.eval_interval is set but there is no validation data (data.valid_paths is empty "
                "and data.split gives validation no documents); set logging.eval_interval=0 to train without"
            )
        return datasets

    def _initial_weights(
        self, model: torch.nn.Module, tag: str | None, resume_state: dict[str, Any] | None, same_world: bool
    ) -> dict[str, Any]:
        """Put the starting weights into the (possibly partitioned) model; return their provenance.

        Weights are written before the engine exists, so its fp32 master copy starts from them.
        """
        if resume_state is not None and same_world:
            return resume_state["provenance"]  # engine.load brings the weights, the optimizer with them
        if ds.is_partitioned(model):
            model.initialize_weights_with(ds.gather_for_write)  # ZeRO-3: post_init saw placeholders
        if resume_state is not None:
            # Another number of ranks: ZeRO shards do not fit; rebuild fp32 weights from the tag.
            state = ds.consolidated_state_dict(self.checkpoint_dir, tag) if dist.is_main_process() else None
            ds.write_weights(model, state)
            return resume_state["provenance"]
        init_from = self.cfg.model.init_from
        if init_from is None:
            return {"init": "random", "preset": self.cfg.model.preset, "seed": self.cfg.seed}
        state, provenance = None, None
        if dist.is_main_process():
            state = match_state_dict(load_checkpoint_state_dict(init_from), model, source=init_from)
            provenance = _provenance(Path(init_from))
        ds.write_weights(model, state)
        return dist.broadcast_object(provenance)

    def _restore_moments(self, tag: str) -> bool:
        """Another number of ranks: carry the Adam moments and step count over (ZeRO-3 only)."""
        if ds.zero_stage(self.ds_config) != 3:
            return False
        moments, adam_step = (None, None)
        if dist.is_main_process():
            moments, adam_step = ds.consolidated_optimizer_state(self.checkpoint_dir, tag)
        self.engine.set_optimizer_state(moments, adam_step, self.state.step, self.state.consumed_samples)
        return True

    def _restore(self, client: dict[str, Any], restore_rng: bool) -> None:
        self.state = TrainState(
            step=int(client["step"]),
            consumed_samples=int(client["consumed_samples"]),
            consumed_tokens=int(client["consumed_tokens"]),
        )
        if restore_rng:
            checkpoint.restore_rng(client["rng"][dist.rank()])

    def _record(self) -> dict[str, Any]:
        """What the summary reports from earlier intervals and launches, for the checkpoint."""
        last_train = {k: self._last_train.get(k) for k in _RECORDED_TRAIN_KEYS}
        return json_safe(
            {
                "first_loss": self._first_loss,
                "last_train": last_train,
                "last_eval": self._last_eval,
                "initial_eval": self._initial_eval,
            }
        )

    def _restore_record(self, record: dict[str, Any]) -> None:
        self._first_loss = record["first_loss"]
        self._last_train = dict(record["last_train"])
        self._last_eval = record["last_eval"]
        self._initial_eval = record["initial_eval"]

    def _log_start(self, resume_tag: str | None, same_world: bool) -> None:
        model = self.engine.module
        total = sum(ds.full_shape(p).numel() for p in model.parameters())
        self.parameter_counts = {
            "total": total,
            "per_rank": dist.all_gather_object(ds.local_parameter_count(model)),
        }
        cfg = self.model_config
        lines = [
            f"run directory: {self.run_dir}",
            f"batch: {self.plan.describe()}",
            f"model: {total:,} parameters, {cfg.num_passes} passes, adaptive={cfg.adaptive}; "
            f"stored per rank: {self.parameter_counts['per_rank']}",
            f"initial weights: {_describe_provenance(self.provenance)}",
            f"MFU peak: {self.peak_flops.source}",
        ]
        if resume_tag is not None:
            how = "full state"
            if not same_world:
                how = "rank count changed: " + (
                    "weights, Adam moments and step counts"
                    if self.moments_restored
                    else "weights only, optimizer reset (moments carry over under ZeRO-3 only)"
                )
            lines.append(
                f"resumed from {self.checkpoint_dir / resume_tag} ({how}) at step {self.state.step}, "
                f"consumed samples {self.state.consumed_samples:,}"
            )
        for line in lines:
            self.writer.console(line)
        self.writer.text("run/config", "```\n" + dump_config(self.cfg) + "\n```")
        self.writer.text("run/batch", self.plan.describe())

    # ----------------------------------------------------------------------------------------------
    # The loop.

    def train(self) -> dict[str, Any]:
        """Train to the end, to `exit_at_step`, or to a SIGTERM/SIGUSR1; checkpoint; return a summary."""
        own = self.signals is None
        signals = self.signals or DeferredSignals()
        try:
            self.signals = signals
            status = self._loop()
        finally:
            if own:
                signals.restore()
        return self._finish(status)

    @property
    def _stop_signal(self) -> str | None:
        return self.signals.received if self.signals is not None else None

    def _loop(self) -> str:
        cfg, plan = self.cfg, self.plan
        if self.state.step >= plan.train_steps:
            return "already complete"
        batches = iter(build_dataloader(self.datasets["train"], self.sampler, cfg.data.num_workers))
        if cfg.model.init_from is not None and self.state.step == 0 and cfg.logging.eval_interval:
            # The pretrained checkpoint's own validation loss, before any update: a wrong embedding
            # scale or pondering setting shows here rather than as a mysteriously high first loss.
            self.writer.console(f"evaluating {cfg.model.init_from} as loaded (step 0)")
            self._evaluate()
            self._initial_eval = self._last_eval
        self.engine.train()
        self.meter.start_clock()
        while self.state.step < plan.train_steps:
            step = self.state.step + 1
            settings = self.schedules.at(step, self.state.consumed_tokens + plan.tokens_per_step)
            self._train_step(batches, settings)
            self.state.step = step
            self.state.consumed_samples += plan.global_batch_size
            self.state.consumed_tokens += plan.tokens_per_step
            self.writer.step_done()
            last = step == plan.train_steps
            if step % cfg.logging.log_interval == 0 or last:
                self._log_train(settings)
            started = time.perf_counter()
            if cfg.logging.eval_interval and (step % cfg.logging.eval_interval == 0 or last):
                self._evaluate()
            stop = self._stop_reason()
            if stop or last or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
                self._save()
            self.meter.exclude(time.perf_counter() - started)
            if stop:
                return stop
        return "finished"

    def _train_step(self, batches: Any, settings: StepSettings) -> None:
        """One optimizer step over gradient_accumulation_steps micro-batches."""
        set_learning_rates(self.engine.param_groups, settings)
        if self._backbone_trainable == settings.gates_only:
            self._backbone_trainable = not settings.gates_only
            set_backbone_trainable(self.engine.module, self._backbone_trainable)
        losses = []
        accumulation = self.plan.gradient_accumulation_steps
        step = self.state.step + 1
        for micro in range(accumulation):
            tokens_BT1 = next(batches).to(self.device, non_blocking=True)  # [mb, seq_len + 1]
            self.status.enter("forward", step, micro)
            out = self.engine(
                input_ids=tokens_BT1[:, :-1],
                labels=tokens_BT1[:, 1:],
                shift_labels=False,
                ponder_lambda=settings.ponder_lambda,
                ponder_k=settings.ponder_k,
                **self._stage1_knobs(tokens_BT1, settings),
            )
            self.status.enter("backward", step, micro)
            self.engine.backward(out.loss)
            losses.append(out.loss.detach())
            self.meter.add_micro_batch(out)
            if micro == accumulation - 1:
                self._check_finite(torch.stack(losses))  # before the step that would apply them
            self.status.enter("step", step, micro)
            self.engine.step()
        self.meter.add_step(self.engine.grad_norm())

    def _stage1_knobs(self, tokens_BT1: torch.Tensor, settings: StepSettings) -> dict[str, Any]:
        """The forward's path: sparse or dense per `ponder.sparse_training`; in stage 1 with
        `ponder.halt_during_stage1` off every token runs all K passes (`exit_passes`), which the
        packed path runs as full passes, with the dense path's numbers bit for bit."""
        knobs = {"dense": not self.cfg.ponder.sparse_training}
        if self.cfg.ponder.halt_during_stage1 or settings.ponder_lambda or not self.model_config.adaptive:
            return knobs
        return knobs | {"exit_passes": torch.full_like(tokens_BT1[:, :-1], self.model_config.num_passes)}

    def _check_finite(self, losses: torch.Tensor) -> None:
        local_bad = not bool(torch.isfinite(losses).all())
        if not dist.any_rank(local_bad):
            return
        bad_ranks = [r for r, bad in enumerate(dist.all_gather_object(local_bad)) if bad]
        first = self.state.consumed_samples
        latest = checkpoint.latest_tag(self.checkpoint_dir)
        raise NonFiniteLossError(
            f"non-finite loss at step {self.state.step + 1} on rank(s) {bad_ranks}: data position "
            f"consumed_samples={first}, this step's samples [{first}, {first + self.plan.global_batch_size}) "
            f"(rank r's micro-batch i holds {self.plan.micro_batch_size} samples from "
            f"{first} + (i x {self.plan.data_parallel_size} + r) x {self.plan.micro_batch_size}); "
            f"losses on rank {dist.rank()}: {losses.tolist()}. Nothing was applied or saved; the last good "
            f"checkpoint is {self.checkpoint_dir / latest if latest else 'none'}"
        )

    def _stop_reason(self) -> str | None:
        # Collective every step, so that all ranks stop after the same step.
        if dist.any_rank(self._stop_signal is not None):
            return f"stopped by signal ({self._stop_signal or 'on another rank'})"
        if self.cfg.exit_at_step is not None and self.state.step >= self.cfg.exit_at_step:
            return f"stopped at exit_at_step={self.cfg.exit_at_step}"
        return None

    # ----------------------------------------------------------------------------------------------
    # Metrics, validation, checkpoints.

    def _log_train(self, settings: StepSettings) -> None:
        m = self.meter.reduce()
        self.meter.reset()
        if self._first_loss is None:
            self._first_loss = m["lm_loss"]
        self._last_train = m
        scalars = {
            "train/lm_loss": m["lm_loss"],
            "train/ponder_loss": m["ponder_loss"],
            "train/loss": m["lm_loss"] + settings.ponder_lambda * m["ponder_loss"],
            "train/lr": settings.lr,
            "train/lr_gates": settings.gate_lr,
            "train/grad_norm": m["grad_norm"],
            "train/ponder_lambda": settings.ponder_lambda,
            "train/ponder_k": settings.ponder_k,
            "train/consumed_samples": self.state.consumed_samples,
            "train/consumed_tokens": self.state.consumed_tokens,
            "perf/tokens_per_sec": m["tokens_per_sec"],
            "perf/tflops_per_rank": m["tflops_per_rank"],
            "perf/mfu": m["tflops_per_rank"] / (self.peak_flops.tflops or float("nan")),
            "perf/peak_memory_gib": max(m["peak_memory_gib"]),
            "ponder/mean_passes": m["mean_passes"],
            "ponder/adaptive_flops_fraction": m["adaptive_flops_fraction"],
        }
        if self.cfg.ponder.gates_only:
            scalars["train/lr_backbone"] = settings.backbone_lr
        self.writer.train(self.state.step, scalars, m["passes_count"], m["gate_histograms"])

    def _evaluate(self) -> None:
        """Validation on the same first `eval_samples` samples every time, dense (ZeRO-3)."""
        self.status.enter("eval", self.state.step)
        valid = self.datasets["valid"]
        sampler = PretrainingSampler(
            self.cfg.logging.eval_samples,
            0,
            self.plan.micro_batch_size,
            dist.rank(),
            self.plan.data_parallel_size,
            valid.fingerprint,
        )
        meter = EvalMeter(self.model_config.num_passes, self.device)
        self.engine.eval()
        with torch.no_grad():
            for tokens_BT1 in build_dataloader(valid, sampler, num_workers=0):
                tokens_BT1 = tokens_BT1.to(self.device)
                out = self.engine(input_ids=tokens_BT1[:, :-1], labels=tokens_BT1[:, 1:], shift_labels=False)
                meter.add_micro_batch(out)
        self.engine.train()
        self._last_eval = meter.reduce()
        self.writer.eval(self.state.step, self._last_eval)

    def _client_state(self) -> dict[str, Any]:
        return {
            "schema": CLIENT_STATE_SCHEMA,
            **asdict(self.state),
            "sampler": self.sampler.state_dict(consumed_samples=self.state.consumed_samples),
            "world_size": self.plan.data_parallel_size,
            "zero_stage": ds.zero_stage(self.ds_config),  # the optimizer shards' layout
            "precision": self.cfg.precision,
            "config": config_to_dict(self.cfg),
            "model_config": json.loads(self.model_config.to_json_string()),
            "provenance": self.provenance,
            "rng": dist.all_gather_object(checkpoint.capture_rng()),
            "meter": dist.all_gather_object(self.meter.state_dict()),
            "record": self._record(),
        }

    def _save(self) -> None:
        self.status.enter("checkpoint", self.state.step)
        started = time.perf_counter()
        client_state = self._client_state()
        keep = self.cfg.checkpoint.keep_last
        path = checkpoint.save(self.engine, self.checkpoint_dir, self.state.step, client_state, keep)
        self.writer.console(f"saved checkpoint {path} in {time.perf_counter() - started:.1f}s")
        self.writer.flush()

    def _finish(self, status: str) -> dict[str, Any]:
        self.writer.close()
        path = self.run_dir / "summary.json"
        if status == "already complete":
            # Nothing trained in this launch: the run's record stays as the launch that finished it
            # wrote it (rebuilt from the last checkpoint when that launch died before writing it).
            summary = _read_summary(path) if dist.is_main_process() else None
            if summary is None:
                summary = self._summary("finished")
                if dist.is_main_process():
                    write_durable(path, json.dumps(summary, indent=1, allow_nan=False))
            return {**summary, "status": status}
        summary = self._summary(status)
        if dist.is_main_process():
            write_durable(path, json.dumps(summary, indent=1, allow_nan=False))
        return summary

    def _summary(self, status: str) -> dict[str, Any]:
        """The run's summary.json: strict JSON, a value that is not a number (NaN, inf) is null."""
        latest = checkpoint.latest_tag(self.checkpoint_dir)
        return json_safe(
            {
                "status": status,
                "step": self.state.step,
                "train_steps": self.plan.train_steps,
                "consumed_samples": self.state.consumed_samples,
                "consumed_tokens": self.state.consumed_tokens,
                "batch": self.plan.describe(),
                "first_loss": self._first_loss,
                "last_loss": self._last_train.get("lm_loss"),
                "mean_passes": self._last_train.get("mean_passes"),
                "tokens_per_sec": self._last_train.get("tokens_per_sec"),
                "peak_memory_gib_per_rank": self._last_train.get("peak_memory_gib"),
                "parameters": self.parameter_counts,
                "eval": self._last_eval,
                "initial_eval": self._initial_eval,
                "checkpoint": str(self.checkpoint_dir / latest) if latest else None,
                "tensorboard": str(self.run_dir / "tensorboard"),
            }
        )


_RECORDED_TRAIN_KEYS = ("lm_loss", "mean_passes", "tokens_per_sec", "peak_memory_gib")


def json_safe(value: Any) -> Any:
    """`value` with every float that JSON cannot hold (NaN, +-inf) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or torn: rebuilt from the checkpoint's record
    return summary if isinstance(summary, dict) and "step" in summary else None


def _provenance(root: Path) -> dict[str, Any]:
    """Where the initial weights came from: the directory and a sha256 of each of its files."""
    files = {}
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".model"):
            files[path.name] = checkpoint.sha256_file(path)
    return {"init": "pretrained", "init_from": str(root.resolve()), "sha256": files}


def _describe_provenance(provenance: dict[str, Any]) -> str:
    """One short line: the files' checksums are in every checkpoint's train_state.json."""
    if provenance.get("init") == "pretrained":
        files = provenance.get("sha256", {})
        return (
            f"{provenance['init_from']} ({len(files)} files; their sha256 in each checkpoint's "
            "train_state.json, `provenance`)"
        )
    if provenance.get("init") == "random":
        return f"random (preset {provenance.get('preset')}, seed {provenance.get('seed')})"
    return str(provenance)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report printed by rank 0 (also from `<run_dir>/summary.json`)."""

    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"== run {summary['status']} at step {summary['step']}/{summary['train_steps']} "
        f"({summary['consumed_tokens']:,} tokens) ==",
        f"train loss: {num(summary['first_loss'], '.4f')} (first logged) -> "
        f"{num(summary['last_loss'], '.4f')} (last)",
        f"mean passes per token (last interval): {num(summary['mean_passes'], '.3f')}",
    ]
    if summary.get("initial_eval"):
        ev = summary["initial_eval"]
        lines.append(
            f"validation at step 0 (weights as loaded): loss {ev['lm_loss']:.4f}, ppl {ev['ppl']:.2f}"
        )
    if summary["eval"]:
        ev = summary["eval"]
        lines.append(
            f"validation: loss {ev['lm_loss']:.4f}, ppl {ev['ppl']:.2f}, passes {ev['mean_passes']:.3f}"
        )
    lines += [
        f"throughput (last interval): {num(summary['tokens_per_sec'], ',.0f')} tokens/s",
        f"parameters: {summary['parameters']['total']:,}; "
        f"stored per rank {summary['parameters']['per_rank']}",
        f"checkpoint: {summary['checkpoint']}",
        f"tensorboard: tensorboard --logdir {summary['tensorboard']}",
    ]
    return "\n".join(lines)

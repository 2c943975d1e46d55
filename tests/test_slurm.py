"""launcher/slurm.sh under stand-ins for srun and scontrol: ranks and devices with and without
per-task GPU binding, a port of the job's own, and requeue on SIGUSR1 after the ranks checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# srun: start SLURM_NTASKS copies of the command as Slurm would (on one node), each with its
# SLURM_PROCID / SLURM_LOCALID; GPUs bound per task (FAKE_GPU_BIND=1: each task sees only its own in
# CUDA_VISIBLE_DEVICES) or not (every task sees all of its node's). Forwards SIGUSR1 to the tasks.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
echo "$@" > "$FAKE_OUT/srun_command"
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  local_id=$((i % 2))
  if [[ "${FAKE_GPU_BIND:-0}" == 1 ]]; then gpus="$((4 + local_id))"; else gpus="4,5"; fi
  SLURM_PROCID=$i SLURM_LOCALID=$local_id CUDA_VISIBLE_DEVICES=$gpus "$@" &
  pids+=($!)
done
trap 'kill -USR1 "${pids[@]}"' USR1
status=0
for pid in "${pids[@]}"; do
  while true; do
    code=0; wait "$pid" || code=$?
    if ((code > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  ((code == 0)) || status=$code
done
exit $status
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node-1\nnode-2\n'; exit 0; fi
echo "$@" >> "$FAKE_OUT/scontrol_calls"
"""

# The training entry point slurm.sh starts: the repository's own rank setup, then (FAKE_WAIT=1) it
# waits for SIGUSR1 like the trainer, "checkpoints" and exits 0.
FAKE_PRETRAIN = """
import json, os, signal, sys, time
sys.path.insert(0, os.environ["REAL_REPO"])
from training.distributed import setup_environment
setup_environment()
out = os.environ["FAKE_OUT"]
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
record = {k: os.environ.get(k) for k in keys}
record["argv"] = sys.argv[1:]
record["cwd"] = os.getcwd()
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
    json.dump(record, f)
if os.environ.get("FAKE_WAIT") == "1":
    deadline = time.time() + 60
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    open(f"{out}/checkpointed{os.environ['RANK']}", "w").close()
"""


@pytest.fixture
def cluster(tmp_path):
    bin_dir, repo, out = tmp_path / "bin", tmp_path / "repo", tmp_path / "out"
    for d in (bin_dir, repo / "training", out):
        d.mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (repo / "training" / "pretrain.py").write_text(FAKE_PRETRAIN)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_RANK"))
    }
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHON=sys.executable,
        REAL_REPO=str(REPO),
        FAKE_OUT=str(out),
        SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="node-[1-2]",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_SUBMIT_DIR=str(repo),
    )
    return env, out, repo


def ranks(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.mark.parametrize("bind", [False, True], ids=["all-gpus-visible", "gpu-per-task"])
def test_slurm_ranks_devices_port_and_working_directory(cluster, bind):
    env, out, repo = cluster
    env["FAKE_GPU_BIND"] = "1" if bind else "0"
    done = subprocess.run(
        ["bash", str(REPO / "launcher" / "slurm.sh"), "--config", "run.yaml", "seq_len=64"],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    seen = ranks(out, 2)
    assert [r["RANK"] for r in seen] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in seen} == {"2"}
    assert {r["MASTER_ADDR"] for r in seen} == {"node-1"}
    assert {r["MASTER_PORT"] for r in seen} == {str(20000 + 123456 % 20000)}
    # LOCAL_RANK is the GPU index within what the task sees: with one bound GPU, always 0.
    expected = ["0", "0"] if bind else ["0", "1"]
    assert [r["LOCAL_RANK"] for r in seen] == expected
    assert {r["cwd"] for r in seen} == {str(repo)}
    assert seen[0]["argv"] == ["--config", "run.yaml", "seq_len=64"]
    assert not (out / "scontrol_calls").exists()  # finished normally: no requeue


def test_two_jobs_on_one_node_get_different_ports(cluster):
    from training.distributed import slurm_port

    assert slurm_port("123456") != slurm_port("123457")
    assert all(20000 <= slurm_port(str(j)) < 40000 for j in (0, 19999, 20000, 10**7 + 3))


def test_sigusr1_checkpoints_then_requeues(cluster):
    env, out, repo = cluster
    env["FAKE_WAIT"] = "1"
    job = subprocess.Popen(
        ["bash", str(REPO / "launcher" / "slurm.sh"), "--config", "run.yaml"],
        env=env,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while len(list(out.glob("rank*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(list(out.glob("rank*.json"))) == 2
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends the batch script
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stderr
    assert sorted(p.name for p in out.glob("checkpointed*")) == ["checkpointed0", "checkpointed1"]
    assert (out / "scontrol_calls").read_text().split("\n")[0] == "requeue 123456"


def test_slurm_sh_says_where_it_looks_for_the_code(cluster, tmp_path):
    env, _, _ = cluster
    env["SLURM_SUBMIT_DIR"] = str(tmp_path / "elsewhere")
    done = subprocess.run(
        ["bash", str(REPO / "launcher" / "slurm.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "sbatch from the repository root or set ADAPONDER_REPO" in done.stderr

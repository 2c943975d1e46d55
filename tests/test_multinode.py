"""Two "nodes" on this machine: two `deepspeed --no_ssh --node_rank R` launches of
launcher/multinode.sh with one hostfile, over loopback. They train, checkpoint, are killed, resume."""

import subprocess
import sys

import psutil
from helpers import REPO, environment, make_config, run_dir, summary

from training.checkpoint import latest_tag, tag_for
from training.distributed import free_port

STEPS = 4


def launch(config, hostfile, node_rank: int, port: int) -> subprocess.Popen:
    env = environment()
    env.update(
        HOSTFILE=str(hostfile),
        NODE_RANK=str(node_rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner",
    )
    return subprocess.Popen(
        ["bash", str(REPO / "launcher" / "multinode.sh"), "no_ssh", "--", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE if node_rank == 0 else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if node_rank == 0 else subprocess.DEVNULL,
        text=True,
    )


def kill_tree(proc: subprocess.Popen) -> None:
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=60)


def test_two_nodes_train_checkpoint_are_killed_and_resume(tmp_path, train_shards):
    config = make_config(
        tmp_path,
        train_shards,
        "two_nodes",
        train_steps=STEPS,
        checkpoint__interval=2,
        logging__eval_interval=0,
    )
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    nodes = [launch(config, hostfile, rank, port) for rank in (0, 1)]
    seen = []
    try:
        for line in nodes[0].stdout:
            seen.append(line)
            if line.startswith("step 3/"):  # checkpoint 2 is complete
                break
    finally:
        for node in nodes:
            kill_tree(node)
    assert any("2 ranks" in line for line in seen), "".join(seen[-30:])
    checkpoints = run_dir(config) / "checkpoints"
    assert latest_tag(checkpoints) == tag_for(2)

    port = free_port()
    nodes = [launch(config, hostfile, rank, port) for rank in (0, 1)]
    try:
        output = nodes[0].communicate(timeout=300)[0]
        assert [node.wait(timeout=60) for node in nodes] == [0, 0], output[-3000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_tree(node)
    assert "(full state) at step 2" in output
    result = summary(run_dir(config))
    assert (result["status"], result["step"]) == ("finished", STEPS)
    assert latest_tag(checkpoints) == tag_for(STEPS)

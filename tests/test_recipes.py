"""The continued-pretraining recipes plan and run as their comments say, on a machine without weights."""

import re

import pytest

from training.config import REPO_ROOT, read_config
from training.pretrain import main

CONTINUED = sorted((REPO_ROOT / "configs").glob("*-continued.yaml"))


def comment_commands(path):
    """The shell commands in a recipe's comments (`#   deepspeed ...` with `\\` continuations)."""
    commands, current = [], None
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if current is None and re.match(r"(deepspeed|adaponder-train|torchrun|python) ", text):
            current = ""
        if current is not None:
            current += " " + text.rstrip("\\").strip()
            if not text.endswith("\\"):
                commands.append(current.split())
                current = None
    return commands


@pytest.mark.parametrize("world_size", [8, 16])
@pytest.mark.parametrize("path", CONTINUED, ids=lambda p: p.name)
def test_continued_recipes_plan_without_their_weights(path, world_size, capsys):
    assert (
        main(["--config", str(path), "--dry-run", "--world-size", str(world_size), "--gpu-memory-gib", "80"])
        == 0
    )
    out, err = capsys.readouterr()
    assert "is not on this machine: planning with the shape of preset pythia-" in err
    assert f"x {world_size} ranks" in out and "planned peak" in out


@pytest.mark.parametrize("path", CONTINUED, ids=lambda p: p.name)
def test_the_command_in_each_recipe_comment_plans_as_written(path, capsys):
    (command,) = comment_commands(path)
    assert command[:3] == ["deepspeed", "--num_gpus", "8"] or command[:2] == ["deepspeed", "--hostfile"]
    args = command[command.index("training/pretrain.py") + 1 :]
    assert main([*args, "--dry-run", "--world-size", "8"]) == 0, capsys.readouterr().err
    cfg = read_config(args[1], args[2:])
    # no data.tokenizer in the recipe: the one in model.init_from (the command's path) is used
    assert cfg.data.tokenizer is None or cfg.data.tokenizer == cfg.model.init_from


def test_the_tokenizer_comes_from_init_from_when_the_recipe_names_none(tmp_path):
    pythia = tmp_path / "pythia-70m"
    pythia.mkdir()
    (pythia / "config.json").write_text("{}")
    (pythia / "tokenizer.json").write_text("{}")
    path = REPO_ROOT / "configs" / "pythia-70m-continued.yaml"
    cfg = read_config(path, [f"model.init_from={pythia}"])
    assert cfg.data.tokenizer == str(pythia)
    assert read_config(path, [f"model.init_from={pythia}", "data.tokenizer=/t"]).data.tokenizer == "/t"


def test_a_dry_run_without_weights_and_without_a_size_in_the_name_says_how(tmp_path, capsys):
    path = REPO_ROOT / "configs" / "pythia-70m-continued.yaml"
    assert main(["--config", str(path), f"model.init_from={tmp_path / 'mystery'}", "--dry-run"]) == 2
    assert "model.preset=pythia-SIZE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path", [p for p in CONTINUED if "adaponder-prepare" in p.read_text()], ids=lambda p: p.name
)
def test_the_prepare_commands_in_a_recipe_comment_are_accepted_as_written(path, monkeypatch):
    import data.prepare

    calls = []
    monkeypatch.setattr(data.prepare, "prepare_pythia", lambda *a: calls.append(a) or a[2])
    monkeypatch.setattr(
        data.prepare, "join_pile", lambda *a: calls.append(a) or {"pieces": 1, "bytes": 0, "output": a[1]}
    )
    lines = [
        line.lstrip("#").split() for line in path.read_text().splitlines() if "adaponder-prepare" in line
    ]
    for words in lines:
        assert data.prepare.main(words[1:]) == 0
    size = path.name.split("-")[1]
    init_from = next(c for c in comment_commands(path)[0] if c.startswith("model.init_from="))
    assert calls[0] == (size, 143000, init_from.split("=", 1)[1], None)  # the directory training reads

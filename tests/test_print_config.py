"""`adaponder-train --print-config`: every key with its meaning and default; typos get a suggestion."""

import pytest
import yaml

from training.config import REPO_ROOT, config_to_dict, read_config
from training.pretrain import main


def test_print_config_shows_every_key_with_its_meaning_and_loads_back(capsys):
    recipe = str(REPO_ROOT / "configs" / "pythia-1.4b-continued.yaml")  # its weights are not here
    assert main(["--print-config", "--config", recipe, "optimizer.lr=1e-4"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed == config_to_dict(read_config(recipe, ["optimizer.lr=1e-4"]))
    assert "  lr: 0.0001  # default: 0.001" in text.splitlines()

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and key != "overrides":
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    lines = text.splitlines()
    path: list[str] = []
    explained = set()
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        key = line.strip().split(":")[0]
        path = path[:depth] + [key]
        if lines[i - 1].lstrip().startswith("# ") and len(lines[i - 1].strip()) > 10:
            explained.add(".".join(path))
    assert set(leaves(printed)) <= explained  # a comment explains each key


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "suggestion"),
    [
        ("logging:\n  log_intervl: 3\n", [], "did you mean 'logging.log_interval'?"),
        ("sequence_len: 128\n", [], "did you mean 'seq_len'?"),
        ("", ["lr=3e-4"], "did you mean 'optimizer.lr'?"),
        ("", ["schedule.warmpu=3"], "did you mean 'schedule.warmup'?"),
    ],
)
def test_a_typo_in_a_key_gets_the_nearest_key(tmp_path, yaml_text, overrides, suggestion):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text or "{}\n")
    with pytest.raises(ValueError, match="unknown config key") as error:
        read_config(config, overrides)
    assert suggestion in str(error.value)

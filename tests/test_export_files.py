"""An export is readable by colleagues and its tokenizer is ready for batched use (1-rank CPU run)."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_config, run_dir, train

from training.export import export_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_shards):
    config = make_config(
        tmp_path_factory.mktemp("export"), train_shards, "run", train_steps=1, logging__eval_interval=0
    )
    train(config, nproc=1)
    return run_dir(config)


def test_export_modes_follow_the_umask(run, tmp_path):
    previous = os.umask(0o022)
    try:
        export_checkpoint(run, tmp_path / "export")
    finally:
        os.umask(previous)
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in [tmp_path / "export", *(tmp_path / "export").iterdir()]
    }
    assert modes.pop("export") == 0o755
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}


def test_exported_tokenizer_pads_knows_the_context_and_loads_without_a_prompt(run, tmp_path):
    export_checkpoint(run, tmp_path / "export")
    # A fresh interpreter without this package on the path, as a colleague would load it; stdin closed,
    # so an interactive question would show in the output.
    script = f"""
from transformers import AutoTokenizer, PreTrainedTokenizerFast
for tok in (AutoTokenizer.from_pretrained({str(tmp_path / "export")!r}, trust_remote_code=True),
            PreTrainedTokenizerFast.from_pretrained({str(tmp_path / "export")!r})):
    batch = tok(["def f():", "import os\\nimport sys"], padding=True)
    assert len(set(map(len, batch["input_ids"]))) == 1 and 0 in batch["attention_mask"][0]
    print("pad", tok.pad_token, "max", tok.model_max_length)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr
    assert result.stdout.splitlines() == ["pad <|endoftext|> max 256"] * 2
    settings = (Path(tmp_path / "export") / "tokenizer_config.json").read_text()
    assert "local_files_only" not in settings


def pythia_directory(root: Path, tokenizer: str) -> Path:
    """A tiny GPT-NeoX (Pythia-format) Hugging Face directory with the run's tokenizer."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
    )  # fmt: skip
    GPTNeoXForCausalLM(config).save_pretrained(root)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(root)
    return root


def test_every_command_takes_a_run_its_checkpoint_an_export_or_a_pythia_directory(
    run, tmp_path, train_shards, capsys
):
    from launcher.generate import main as generate
    from training.evaluate import load_model

    export_checkpoint(run, tmp_path / "export")
    pythia = pythia_directory(tmp_path / "pythia", train_shards[1])
    names = [  # (path, tag)
        (run, None),
        (run, "step-00000001"),
        (run, "latest"),
        (run / "checkpoints", None),
        (run / "checkpoints" / "step-00000001", None),
        (tmp_path / "export", None),
        (pythia, None),
    ]
    for path, tag in names:
        tag_args = ["--tag", tag] if tag else []
        args = ["--model", str(path), *tag_args, "--prompt", "def f(", "--max-new-tokens", "2", "--greedy"]
        assert generate(args) == 0
        assert re.search(r"\(\d tokens, [\d.]+ of 4 passes per token\)", capsys.readouterr().out), path
        model, tokenizer, described = load_model(path, tag)
        assert tokenizer is not None and described["parameters"] > 0, path
    assert load_model(pythia)[2]["kind"] == "gpt_neox checkpoint"
    with pytest.raises(ValueError, match="not a run directory"):
        load_model(tmp_path / "export", "step-00000001")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)

"""Bad input to the command-line tools: a clear error naming the file or field, nothing half-written."""

import gzip
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import random_halting_model, save_tiny_tokenizer

import data.preprocess as preprocess_module
from data.config import DataConfig
from data.dataset import build_datasets
from data.indexed import MMapIndexedDatasetBuilder
from data.preprocess import _Encoder, preprocess
from data.tokenizer import load_tokenizer
from launcher import generate as generate_cli
from training.config import load_config


def test_non_utf8_jsonl_is_an_error_naming_the_file(tmp_path, train_shards):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"text": "ok"}).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"{bad}:2: not UTF-8 text"):
        preprocess([str(bad)], train_shards[1], str(tmp_path / "out"), progress=False)
    assert not list(tmp_path.glob("out*"))


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path, train_shards):
    whole = gzip.compress("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(2000)).encode())
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=f"{bad}: corrupt or truncated after line"):
        preprocess([str(bad)], train_shards[1], str(tmp_path / "out"), progress=False)
    assert not list(tmp_path.glob("out*"))


def test_a_huge_document_is_tokenized_in_pieces_with_the_same_ids(monkeypatch, train_shards):
    corpus = Path(train_shards[0]).parent / "stdlib.jsonl"
    text = "".join(json.loads(line)["text"] for line in corpus.read_text().splitlines()[:40])
    tokenizer = load_tokenizer(train_shards[1])
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(preprocess_module, "load_tokenizer", lambda path: tokenizer)
    monkeypatch.setattr(tokenizer, "encode", lambda t: calls.append(len(t)) or encode(t))
    monkeypatch.setattr(preprocess_module, "_PIECE_CHARS", len(text) // 10)
    ids = _Encoder(train_shards[1], tokenizer.eod_id, "uint16").encode_document(text)
    pieces = [n for n in calls if n > 2 * preprocess_module._SEAM_CHARS]
    assert len(pieces) >= 9 and max(pieces) < len(text) // 5  # never the whole document at once
    np.testing.assert_array_equal(ids, np.array(encode(text) + [tokenizer.eod_id], dtype=np.uint16))


def test_seq_len_beyond_the_position_table_is_an_error():
    with pytest.raises(ValueError, match="seq_len 512 exceeds the model's max_position_embeddings 256"):
        load_config(None, ["model.preset=tiny", "seq_len=512", "train_steps=1"])


def test_an_overrides_bad_value_is_blamed_on_the_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "seq_len": 32, "train_steps": 1}))
    with pytest.raises(ValueError) as error:
        load_config(path, ["optimizer.lr=fast"])
    assert str(error.value).startswith("override 'optimizer.lr=fast': optimizer.lr must be of type float")
    with pytest.raises(ValueError, match=f"^{path}: seq_len must be of type int"):
        path.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "seq_len": "long", "train_steps": 1}))
        load_config(path, ["optimizer.lr=0.1"])


def test_an_empty_prompt_is_a_clear_error(tmp_path, capsys):
    random_halting_model().eval().save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        generate_cli.main(["--model", str(tmp_path), "--prompt", "w1", "--prompt", ""])
    assert exit_.value.code == 2
    assert "--prompt number [2] is empty" in capsys.readouterr().err
    model = generate_cli.load_model(str(tmp_path), "cpu")
    tokenizer = generate_cli.load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] give no tokens"):
        generate_cli.generate(model, tokenizer, ["   "], 4, None)


def _shard(prefix: Path, docs: list[list[int]]) -> str:
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as builder:
        for doc in docs:
            builder.add_item(doc)
            builder.end_document()
        builder.finalize()
    return str(prefix)


def test_token_ids_past_the_vocabulary_are_named_when_the_shard_is_opened(tmp_path):
    prefix = _shard(tmp_path / "shard", [[1, 2, 3, 4] * 10, [5, 6, 700, 7] * 10])
    cfg = DataConfig(train_paths=[prefix], split="100,0,0")
    for _ in range(2):  # the second time from the cached id range
        with pytest.raises(
            ValueError, match="shard.bin: token id 700 at position 2 of document 1 .*\\[0, 512\\)"
        ):
            build_datasets(cfg, 8, {"train": 4}, vocab_size=512)
    assert len(build_datasets(cfg, 8, {"train": 4}, vocab_size=1024)["train"]) >= 4


def test_eval_checks_output_positions_and_token_ids_before_evaluating(tmp_path, monkeypatch, capsys):
    from training import evaluate

    model_dir = tmp_path / "model"
    random_halting_model().eval().save_pretrained(model_dir)  # 64 positions, 96 ids
    good = _shard(tmp_path / "good", [[1, 2, 3, 4] * 20])
    bad = _shard(tmp_path / "bad", [[1, 2, 3, 4] * 20, [5, 96, 7]])
    ran = []
    monkeypatch.setattr(evaluate, "perplexity_points", lambda *a, **k: ran.append(1) or [])
    (tmp_path / "taken").write_text("a file")
    out = ["--output", str(tmp_path / "out")]
    cases = [
        (["--output", str(tmp_path / "taken"), "--data", good], "--output .*taken: .* is a file"),
        ([*out, "--data", good, "--seq-len", "100"], "--seq-len 100 runs past the model's 64 positions"),
        ([*out, "--data", bad], "token id 96 at position 1 of document 1 is outside"),
    ]
    for args, message in cases:
        assert evaluate.main([str(model_dir), "--no-progress", *args]) == 2
        assert re.search(message, capsys.readouterr().err), message
    assert ran == []  # refused before any evaluation
    assert (
        evaluate.main([str(model_dir), "--no-progress", "--output", str(tmp_path / "out"), "--data", good])
        == 0
    )
    assert (
        json.loads((tmp_path / "out" / "eval.json").read_text())["data"]["seq_len"] == 64
    )  # the default, capped


WRITE_REPORT_ON_A_FULL_DISK = """
import resource, signal, sys
from training.evaluate import write_report
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_report({"points": ["x" * 100] * 100}, sys.argv[1])
except OSError as e:
    print("failed:", e)
"""


def test_eval_json_is_replaced_whole_or_not_at_all(tmp_path):
    (tmp_path / "eval.json").write_text('{"points": "earlier results"}')
    result = subprocess.run(
        [sys.executable, "-c", WRITE_REPORT_ON_A_FULL_DISK, str(tmp_path)], capture_output=True, text=True
    )
    assert "failed:" in result.stdout, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text()) == {"points": "earlier results"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_generate_refuses_to_run_past_the_models_positions(tmp_path):
    random_halting_model().eval().save_pretrained(tmp_path)  # 64 positions
    save_tiny_tokenizer(tmp_path)
    model = generate_cli.load_model(str(tmp_path), "cpu")
    tokenizer = generate_cli.load_tokenizer(str(tmp_path))
    with pytest.raises(
        ValueError, match="prompt \\(60 tokens\\) plus --max-new-tokens 8 runs past the model's 64"
    ):
        generate_cli.generate(model, tokenizer, [" ".join(["w1"] * 60)], 8, None)
    assert len(generate_cli.generate(model, tokenizer, [" ".join(["w1"] * 60)], 4, None)[0][0]) <= 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("seq_len=[", "override 'seq_len=[': the value '[' is not valid YAML"),
        ("model.overrides.hidden_size=big", "model.overrides.hidden_size must be of type int, got 'big'"),
        ("model.overrides.max_passes=x", "model.overrides.max_passes must be of type int or NoneType"),
    ],
)
def test_a_malformed_override_value_is_a_clear_error(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, ["model.preset=tiny", "train_steps=1", "seq_len=32", override])


def test_a_torn_tokenizer_config_is_named(tmp_path, train_shards):
    shutil.copytree(train_shards[1], tmp_path / "tok")
    config = tmp_path / "tok" / "tokenizer_config.json"
    config.write_text(config.read_text()[:30])  # a copy cut short
    with pytest.raises(ValueError, match=f"{config}: not a readable tokenizer config"):
        load_tokenizer(str(tmp_path / "tok"))


class _UnbuildableDtype:
    def __reduce__(self):
        return (np.dtype, ("X9",))  # an allowlisted type with arguments it cannot build


def test_a_checkpoint_file_with_an_unbuildable_numpy_dtype_is_named(tmp_path):
    import torch

    from training.engine import check_safe_to_load

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"rng": _UnbuildableDtype()}, path)
    with pytest.raises(ValueError, match=f"{path}: unreadable checkpoint file \\(TypeError"):
        check_safe_to_load(path)


def test_a_killed_writers_temporary_files_are_removed_by_the_next(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, prefix = socket.gethostname(), tmp_path / "shard"
    stale = [tmp_path / f"shard.{ext}.{host}.{dead.pid}.tmp" for ext in ("bin", "idx")]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    kept = [
        tmp_path / f"shard.bin.{host}.{alive.pid}.tmp",  # still being written
        tmp_path / f"shard.bin.other-host.{dead.pid}.tmp",  # a pid of another machine means nothing here
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    try:
        with MMapIndexedDatasetBuilder(prefix, np.uint16) as builder:
            builder.add_item([1, 2])
            builder.end_document()
            builder.finalize()
    finally:
        alive.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["shard.bin", "shard.idx", *(p.name for p in kept)]
    )


PREPROCESS_THAT_HANGS = """
import sys, time
import data.preprocess as preprocess
def documents(*args, **kwargs):
    yield "def f():\\n    return 1\\n" * 50
    time.sleep(120)  # a slow source: the run is stopped here
preprocess.iter_documents = documents
preprocess._CHUNK_DOCS = 1
sys.exit(preprocess.main(sys.argv[1:]))
"""


def test_sigterm_during_preprocess_leaves_no_temporary_files(tmp_path, train_shards):
    (tmp_path / "in.txt").write_text("unused")
    proc = subprocess.Popen(
        [sys.executable, "-c", PREPROCESS_THAT_HANGS, "--input", str(tmp_path / "in.txt"), "--tokenizer",
         train_shards[1], "--output-prefix", str(tmp_path / "out")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("out.bin.*.tmp")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130, proc.stderr.read()
    finally:
        proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]

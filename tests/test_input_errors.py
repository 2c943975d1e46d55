"""Bad input to the command-line tools: a clear error naming the file or field, nothing half-written."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_inference import save_tiny_tokenizer
from tiny_models import random_halting_model

import data.preprocess as preprocess_module
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

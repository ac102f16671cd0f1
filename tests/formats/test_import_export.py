"""`kiln import` of Hugging Face folders and `kiln export --format hf`, checked against transformers itself:
the same logits, the same greedy continuation, the same token ids (chat template included)."""

import json
import shutil

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from kiln.cli import main
from kiln.config.rundir import RunDir
from kiln.formats.checkpoint import latest_checkpoint, load_model
from kiln.formats.export import export_hf
from kiln.formats.gguf_vocab import QWEN2_SPLIT
from kiln.infer.generate import generate
from kiln.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["def f(x):\n    return x ** 2", "Héllo wörld — 42 ١٢٣ 😀", "  spaces\tand\n\nnewlines ", "<|im_end|> in text"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
FAMILIES = {
    "llama-tied-gqa": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_key_value_heads=2,
                           tie_word_embeddings=True),
    "llama3-untied": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_key_value_heads=1,
                          tie_word_embeddings=False, max_position_embeddings=64,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen3-wide-heads": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_key_value_heads=2,
                             head_dim=24, tie_word_embeddings=True, use_sliding_window=False),
    "qwen2-biases": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_key_value_heads=2,
                         tie_word_embeddings=True, use_sliding_window=False, sliding_window=32, max_window_layers=2),
}


def chatml_tokenizer(folder, qwen: bool = False):
    """A small byte-level BPE with ChatML specials, saved as transformers saves one. `qwen`: split and normalised
    as Qwen2's tokenizer is (transformers' Qwen2Tokenizer imposes that on whatever tokenizer.json says)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64}))
    return tok.get_vocab_size()


def hf_folder(folder, family):
    folder.mkdir()
    vocab = chatml_tokenizer(folder, qwen=family.startswith("qwen2"))
    cfg = {**dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=vocab, max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=5000.0,
                  eos_token_id=2), **FAMILIES[family]}
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(folder)
    return model


def logits_equal(ours, hf, n=None):
    ids = torch.randint(0, ours.cfg.vocab_size, (2, n or ours.cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf(input_ids=ids).logits.float()).abs().max().item()
    assert diff <= 1e-4, diff


def same_ids(tok: Tokenizer, hf_tok):
    for t in TEXTS[:3]:
        assert tok.encode(t) == hf_tok(t, add_special_tokens=False)["input_ids"], t
    # Marker text inside a document stays text in kiln (transformers would make it the special id).
    assert tok.eos_id not in tok.encode(TEXTS[3]) and tok.decode(tok.encode(TEXTS[3])) == TEXTS[3]
    for gen in (False, True):
        ref = hf_tok.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert tok.encode_chat(CHAT, add_generation_prompt=gen) == list(ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_then_export_matches_transformers(tmp_path, family):
    hf = hf_folder(tmp_path / "hf", family)
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "hf"), "--run_dir", str(run)]) == 0
    ckpt = latest_checkpoint(RunDir(run).checkpoints)
    model, cfg = load_model(ckpt, "cpu")
    assert cfg.model.qk_norm == family.startswith("qwen3") and cfg.model.qkv_bias == family.startswith("qwen2")
    logits_equal(model, hf)
    tok = Tokenizer.from_file(RunDir(run).tokenizer_file())
    assert tok.bos_id is None and tok.eos_id == tok.token_to_id("<|im_end|>")
    same_ids(tok, transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"))

    out = tmp_path / "export"
    assert main(["export", "--run_dir", str(run), "--format", "hf", "--out", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    logits_equal(model, back)
    same_ids(tok, transformers.AutoTokenizer.from_pretrained(out))
    prompt = tok.encode_chat(CHAT[3:], add_generation_prompt=True)
    ours = generate(model, prompt, 8, temperature=0.0)
    with torch.no_grad():
        theirs = back.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_export_of_a_kiln_run_loads_in_transformers(micro_run, tmp_path):
    from kiln.pipeline import run_stage
    from micro import micro_config
    run_stage(micro_config(micro_run, train={"max_steps": 2}), "pretrain")
    rd = RunDir(micro_run)
    out = export_hf(latest_checkpoint(rd.checkpoints), rd, tmp_path / "hf", None, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    model, _ = load_model(latest_checkpoint(rd.checkpoints), "cpu")
    logits_equal(model, transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    tok = Tokenizer.from_file(rd.tokenizer_file())
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ref = hf_tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    plain_chat = [{"role": m["role"], "content": m["content"].replace("<|im_end|>", "")} for m in CHAT]
    ref = hf_tok.apply_chat_template(plain_chat, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert tok.encode_chat(plain_chat, add_generation_prompt=True) == list(ref)
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.token_to_id("<|end|>") in gen["eos_token_id"] and tok.eos_id in gen["eos_token_id"]
    assert "parameters" in (out / "README.md").read_text()
    with pytest.raises(FileExistsError):
        export_hf(latest_checkpoint(rd.checkpoints), rd, out, None, max_shard_bytes=10**9)


def test_bad_sources_fail_clearly_and_write_nothing(tmp_path, capsys):
    hf_folder(tmp_path / "hf", "llama-tied-gqa")
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "nowhere"), "--run_dir", str(run)]) == 2
    assert "does not exist" in capsys.readouterr().err

    cfg_path = tmp_path / "hf" / "config.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**good, "intermediate_size": 80}))
    assert main(["import", str(tmp_path / "hf"), "--run_dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.gate_proj.weight" in err and "(96, 48)" in err and "(80, 48)" in err
    assert not (run / "checkpoints").exists() and not (run / "tokenizer").exists()

    cfg_path.write_text(json.dumps({**good, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert main(["import", str(tmp_path / "hf"), "--run_dir", str(run)]) == 1
    assert "GPT2LMHeadModel" in capsys.readouterr().err

    cfg_path.write_text(json.dumps(good))
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert main(["import", str(tmp_path / "hf"), "--run_dir", str(run)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err

    shutil.rmtree(tmp_path / "hf")
    hf_folder(tmp_path / "hf", "llama-tied-gqa")
    weights = tmp_path / "hf" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])       # an interrupted download
    assert main(["import", str(tmp_path / "hf"), "--run_dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors: not a readable safetensors file" in err and "truncated" in err
    assert not (run / "checkpoints").exists()
    weights.write_bytes(data)
    assert main(["import", str(tmp_path / "hf"), "--run_dir", str(run)]) == 0
    assert main(["import", str(tmp_path / "hf"), "--run_dir", str(run)]) == 2   # refuses to replace it
    assert "--overwrite true" in capsys.readouterr().err

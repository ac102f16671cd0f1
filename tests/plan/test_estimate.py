"""`kiln estimate`: presets, Hugging Face configs, GGUF arithmetic, the CLI's help and JSON."""

from __future__ import annotations

import json

import pytest

from kiln.cli import main
from kiln.config import ModelConfig
from kiln.plan.gguf import bits_per_weight, gguf_file_bytes, gguf_tensor_bytes, gguf_tensors, tensor_type
from kiln.plan.hardware import accelerator, match_device_name
from kiln.plan.memory import param_counts
from kiln.plan.presets import PRESETS, from_hf_config


def test_presets_have_their_published_sizes():
    # Meta's model cards: Llama 3.2 1B 1.24B, 3B 3.21B, Llama 3.1 8B 8.03B, 70B 70.6B; Llama 2 13B 13.0B
    expected = {"1b": 1.24e9, "3b": 3.21e9, "8b": 8.03e9, "13b": 13.0e9, "70b": 70.55e9}
    for name, n in expected.items():
        assert param_counts(PRESETS[name][0]).total == pytest.approx(n, rel=0.005), name


def test_a_qwen2_config_counts_its_biases(tmp_path):
    """Qwen2.5-0.5B's config.json: 494,032,768 parameters, as its model card and safetensors index give."""
    hf = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
          "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
          "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0,
          "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 32768}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    m = from_hf_config(tmp_path)
    assert m.qkv_bias and param_counts(m).total == 494_032_768 == m.num_params()


def test_hf_config_maps_to_the_same_model(tmp_path):
    hf = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
          "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 131072}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    m = from_hf_config(tmp_path)
    assert param_counts(m).total == param_counts(PRESETS["1b"][0]).total
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    with __import__("torch").device("meta"):
        model = transformers.LlamaForCausalLM(ref)
    assert param_counts(m).total == sum(p.numel() for p in model.parameters())


def test_hf_config_without_shape_names_the_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="intermediate_size"):
        from_hf_config(tmp_path)


def test_gguf_block_sizes():
    assert [bits_per_weight(t) for t in ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")] == [8.5, 4.5, 5.0, 4.5, 6.5625]
    assert gguf_tensor_bytes((4096, 4096), "q8_0", "blk.0.attn_q.weight") == 4096 * 4096 // 32 * 34
    assert gguf_tensor_bytes((4096,), "q4_0", "blk.0.attn_norm.weight") == 4096 * 4   # 1-D: F32
    assert gguf_tensor_bytes((10, 48), "q4_0", "blk.0.attn_q.weight") == 10 * 48 * 2   # row of 48: F16 fallback


def test_q4_k_m_follows_llama_quantize():
    cfg = PRESETS["8b"][0]   # 32 layers: use_more_bits is true for layers 0-3, 28-31 and 4 + 3k + 2
    more = [i for i in range(32) if tensor_type(f"blk.{i}.ffn_down.weight", (4096, 14336), "q4_k_m", 32) == "q6_k"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("output.weight", (128256, 4096), "q4_k_m", 32) == "q6_k"
    assert tensor_type("token_embd.weight", (128256, 4096), "q4_k_m", 32) == "q4_k"
    assert tensor_type("token_embd.weight", (128256, 4096), "q4_k_m", 32, tied=True) == "q6_k"
    assert tensor_type("blk.5.attn_q.weight", (4096, 4096), "q4_k_m", 32) == "q4_k"
    assert tensor_type("blk.5.attn_q.weight", (64, 96), "q4_k_m", 32) == "q5_0"   # 96 % 256: fallback
    size = gguf_file_bytes(cfg, "q4_k_m")
    assert 4.8 < 8 * size / param_counts(cfg).total < 4.95   # llama.cpp's Llama-3.1-8B Q4_K_M: 4.58 GiB
    assert len(gguf_tensors(cfg)) == 1 + 32 * 9 + 2


def test_hardware_table_and_user_numbers():
    h100 = accelerator("H100")
    assert h100.bf16_tflops == pytest.approx(989.4) and "datasheet" in h100.source
    assert match_device_name("NVIDIA H100 80GB HBM3") == h100
    assert accelerator("h100", tflops=500).bf16_tflops == 500
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        accelerator("mystery-gpu")
    assert accelerator("mystery-gpu", memory_gb=16, tflops=50).memory_gib == 16


def test_help_shows_the_worked_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["estimate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--estimate.lora_rank" in out and "70b" in out and "16 bytes per" in out


def test_json_output_and_run_dir(capsys, tmp_path):
    assert main(["estimate", "124m", "--json", "--estimate.micro_batch", "4", "--run_dir", str(tmp_path)]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["params"]["total"] == param_counts(PRESETS["124m"][0]).total
    assert est["training"]["fits"] and est["training"]["largest_micro_batch"] >= 4
    assert set(est["inference"]["formats"]) >= {"bf16", "int8", "gguf q4_k_m", "gguf q8_0"}
    assert json.loads((tmp_path / "plan" / "estimate.json").read_text()) == est


def test_table_for_an_hf_folder_and_lora(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300}))
    assert main(["estimate", str(tmp_path), "--estimate.finetune", "lora", "--estimate.lora_rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face config" in out and "trainable" in out and "gguf q4_k_m" in out


def test_a_kiln_run_directory_as_the_model(capsys, tmp_path):
    """An imported model's run directory (config.yaml, no config.json) is its shape; LoRA estimates AdamW's
    states even when the run's own optimizer is Muon."""
    import yaml
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"depth": 3, "d_model": 96, "n_heads": 4, "n_kv_heads": 2, "head_dim": 24, "ffn_hidden": 256,
                  "vocab_size": 500, "max_seq_len": 512}, "train": {"optimizer": "muon"}}))
    assert main(["estimate", "--estimate.model", str(run), "--json", "--estimate.finetune", "lora"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["params"]["total"] == param_counts(ModelConfig(depth=3, d_model=96, n_heads=4, n_kv_heads=2,
                                                              head_dim=24, ffn_hidden=256, vocab_size=500)).total
    assert est["setup"]["optimizer"] == "adamw" and est["model"]["source"].startswith("kiln run")
    (run / "config.yaml").write_text("train: {}\n")
    assert main(["estimate", "--estimate.model", str(run)]) == 2
    assert "no model section" in capsys.readouterr().err


def test_bad_model_names_the_choices(capsys):
    assert main(["estimate", "--estimate.model", "9000b"]) == 2
    assert "124m" in capsys.readouterr().err


def test_qwen3_shape_uses_head_dim_independently():
    m = ModelConfig(depth=2, d_model=64, head_dim=32, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=100)
    pc = param_counts(m)   # q: 64 x 128, k/v: 64 x 64, o: 128 x 64
    assert pc.per_layer == 64 * 128 * 2 + 64 * 64 * 2 + 3 * 64 * 96 + 2 * 64


def test_pretrain_start_warns_when_the_run_will_not_fit():
    from kiln.config import load_recipe
    from kiln.plan.estimate import startup_estimate
    cfg = load_recipe("tiny", {"model": {"vocab_size": 4096}})
    fits = startup_estimate(cfg, 80 * 2 ** 30, "GPU X")
    assert len(fits) == 1 and "estimate: peak" in fits[0]
    lines = startup_estimate(cfg, 10 ** 6, "GPU X")
    assert lines[-1].startswith("warning:") and "GPU X" in lines[-1] and "micro-batch" in lines[-1]


def test_sft_start_estimates_its_adapters_and_trained_share():
    """`kiln sft` prints the plan for its own run: LoRA / QLoRA adapters on a frozen base, the head on the
    assistant tokens' share, and a warning that names the stage's keys."""
    import dataclasses
    import re

    from kiln.config import LoRAConfig, load_recipe
    from kiln.plan.estimate import startup_estimate
    cfg = load_recipe("tiny", {"model": {"vocab_size": 32768}})

    def peak(**kw) -> float:
        line = startup_estimate(cfg, 80 * 2 ** 30, "GPU X", **kw)[0]
        return float(re.search(r"peak ([\d.,]+) GiB", line).group(1).replace(",", ""))

    full, lora = peak(), peak(lora=LoRAConfig(enabled=True, rank=8, targets=["q_proj", "v_proj"]))
    qlora = peak(lora=LoRAConfig(enabled=True, base_dtype="nf4"))
    assert lora < full and qlora < full
    assert peak(loss_share=0.3) < full
    assert peak(lora=LoRAConfig(enabled=False)) == full
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=cfg.model.max_seq_len // 4))
    assert float(re.search(r"peak ([\d.,]+) GiB", startup_estimate(short, 80 * 2 ** 30, "GPU X")[0]).group(1)) < full
    warn = startup_estimate(cfg, 10 ** 6, "GPU X", keys="sft.train")[-1]
    assert "--sft.train.activation_checkpointing" in warn

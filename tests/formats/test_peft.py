"""LoRA adapters in the PEFT format (kiln/formats/peft.py), checked against PEFT itself: kiln's LoRA model and
PEFT's on the same base and adapter give the same logits, merges agree, PEFT-written adapters load into kiln;
and a LoRA run's checkpoint loads, exports (hf, gguf: merged; peft: the adapter) as a plain model."""

import json
import math

import pytest
import torch

from kiln.cli import main
from kiln.config import LoRAConfig, ModelConfig, TrainConfig
from kiln.config.rundir import RunDir
from kiln.formats.checkpoint import (checkpoint_config, iter_merged_weights, latest_checkpoint, load_merged_state,
                                    load_model, lora_of)
from kiln.formats.hf import hf_state_dict, model_from_state, save_weights, to_hf_config
from kiln.formats.peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_config_from, merge_state, read_adapter,
                               split_adapter, write_adapter)
from kiln.model.llama import Transformer
from kiln.train.checkpoint import save_checkpoint
from kiln.train.lora import apply_lora, lora_state_dict
from kiln.train.optim import build_optimizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0, dropout=0.05)


def tiny_cfg(tie: bool = True) -> ModelConfig:
    return ModelConfig(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=97, max_seq_len=16,
                       rope_theta=5000.0, norm_eps=1e-6, tie_embeddings=tie)


def random_base(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # every tensor random, norm gains included (as tests/formats/test_hf.py)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def trained_lora(cfg: ModelConfig, lora: LoRAConfig = LORA) -> Transformer:
    """The base with adapters trained a few steps on random tokens (so A and B both moved from their init)."""
    model = random_base(cfg)
    apply_lora(model, lora, "cpu")
    opt = build_optimizer(model, TrainConfig(lr=2e-2, weight_decay=0.0), torch.device("cpu"))
    model.train()
    x = ids(cfg, seed=5, batch=4)
    for _ in range(4):
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert any(t.abs().max() > 1e-3 for k, t in lora_state_dict(model).items() if "lora_B" in k)
    return model.eval()


def ids(cfg: ModelConfig, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=torch.Generator().manual_seed(seed))


def kiln_logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def hf_logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def hf_base_folder(folder, model: Transformer):
    """The base model as a Hugging Face folder (config.json + model.safetensors): what `kiln export` writes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(to_hf_config(model.cfg)))
    save_weights(model, folder / "model.safetensors")
    return folder


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_kiln_adapter_in_peft_matches_kiln(tmp_path, tie):
    cfg = tiny_cfg(tie)
    base_dir = hf_base_folder(tmp_path / "base", random_base(cfg))
    model = trained_lora(cfg)
    adapter = write_adapter(tmp_path / "adapter", lora_state_dict(model), LORA, str(base_dir))
    written = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM" and written["r"] == 4
    assert written["lora_alpha"] == 8 and written["target_modules"] == LORA.targets

    theirs = peft.PeftModel.from_pretrained(load_hf(base_dir), adapter).eval()
    x = ids(cfg)
    ours = kiln_logits(model, x)
    assert (ours - hf_logits(theirs, x)).abs().max().item() <= 1e-4

    # PEFT's merge_and_unload and merge_state: the same weights
    merged_theirs = theirs.merge_and_unload().state_dict()
    base_sd, adapters = split_adapter(model.state_dict())
    merged_ours = merge_state(base_sd, adapters, LORA.alpha, LORA.rank)
    assert not any("lora" in k for k in merged_ours)
    assert set(merged_ours) == set(merged_theirs)
    assert max((merged_ours[k] - merged_theirs[k]).abs().max().item() for k in merged_ours) <= 1e-6
    plain = model_from_state(cfg, merged_ours).eval()
    # fp32 rounding of W + s B A against the two matmuls: measured 1.2e-5 on logits up to ~5 (weights of std 0.2)
    assert (kiln_logits(plain, x) - ours).abs().max().item() <= 5e-5


def peft_written_adapter(tmp_path, cfg: ModelConfig, **lora_kw):
    """An adapter made and saved by PEFT on the transformers model of our base, its A and B randomised."""
    base_dir = hf_base_folder(tmp_path / "base", random_base(cfg))
    hf = load_hf(base_dir)
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
              lora_dropout=0.1, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, peft.LoraConfig(**{**kw, **lora_kw})).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    return base_dir, pm, tmp_path / "adapter"


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_adapter_loads_into_kiln(tmp_path, rslora):
    cfg = tiny_cfg()
    base_dir, pm, adapter_dir = peft_written_adapter(tmp_path, cfg, use_rslora=rslora)
    tensors, config = read_adapter(adapter_dir)
    assert "model.layers.1.mlp.down_proj.lora_B.weight" in tensors and not any(k.startswith("base_model") for k in tensors)
    x = ids(cfg)
    theirs = hf_logits(pm, x)
    if rslora:   # kiln's one convention: alpha / r with the alpha giving rsLoRA's alpha / sqrt(r)
        assert config["lora_alpha"] == pytest.approx(16 * math.sqrt(8)) and config["rslora_lora_alpha"] == 16

    lora = lora_config_from(config, tensors)
    assert lora.targets == ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"] and lora.dropout == 0.1
    model = random_base(cfg)
    apply_lora(model, lora, "cpu")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and not any("lora_" in k for k in missing)
    assert (kiln_logits(model.eval(), x) - theirs).abs().max().item() <= 1e-4

    merged = merge_state(hf_state_dict(random_base(cfg)), tensors, config["lora_alpha"], config["r"])
    assert (kiln_logits(model_from_state(cfg, merged).eval(), x) - theirs).abs().max().item() <= 1e-4


def test_unsupported_adapters_fail_clearly(tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(FileNotFoundError, match="no such directory"):
        read_adapter(tmp_path / "nowhere")
    _, _, adapter_dir = peft_written_adapter(tmp_path, cfg)
    good = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    for bad, match in [({"use_dora": True}, "use_dora=True"), ({"bias": "all"}, "bias='all'"),
                       ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"peft_type": "IA3"}, "IA3"),
                       ({"rank_pattern": {"q_proj": 4}}, "rank_pattern")]:
        (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps({**good, **bad}))
        with pytest.raises(ValueError, match=match):
            read_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps({**good, "r": 4}))   # tensors are rank 8
    with pytest.raises(ValueError, match="rank-4 update"):
        read_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(good))
    (adapter_dir / ADAPTER_WEIGHTS).rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        read_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        read_adapter(adapter_dir)

    # adapters of layers kiln has no adapter for (the embedding) are refused by name
    _, _, emb_dir = peft_written_adapter(tmp_path / "emb", cfg, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match="embed_tokens"):
        read_adapter(emb_dir)
    with pytest.raises(ValueError, match="no base weight"):
        merge_state({}, {"model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
                         "model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2)}, 2.0, 2)


def lora_checkpoint(root, model: Transformer, cfg, lora: LoRAConfig, step: int = 1, with_entry: bool = True):
    """Write a checkpoint of a LoRA run as the trainer does (kiln/train/checkpoint.py)."""
    opt = build_optimizer(model, TrainConfig(lr=1e-3), torch.device("cpu"))
    state = {"step": step, "base": "the-base"}
    if with_entry:
        state["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}
    return save_checkpoint(root, step, model, opt, state, cfg, keep=3)


def test_load_model_of_a_lora_checkpoint_is_the_merged_model(tmp_path):
    from kiln.config import Config
    cfg = Config(model=tiny_cfg(), run_dir=str(tmp_path / "run"))
    model = trained_lora(cfg.model)
    ckpt = lora_checkpoint(tmp_path / "ckpts", model, cfg, LORA)
    assert lora_of(ckpt)["rank"] == 4
    loaded, _ = load_model(ckpt, "cpu")
    assert type(loaded) is Transformer and not any("lora" in k for k in loaded.state_dict())
    x = ids(cfg.model)
    want = kiln_logits(model, x)   # merged in fp32: equal to fp32's rounding, relative to the logits' size
    assert (kiln_logits(loaded, x) - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    streamed = dict(iter_merged_weights(ckpt))
    assert streamed.keys() == load_merged_state(ckpt).keys()
    assert all(torch.equal(v, load_merged_state(ckpt)[k]) for k, v in streamed.items())
    bf16, _ = load_model(ckpt, "cpu", torch.bfloat16)   # merged in fp32, then cast
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())

    no_entry = lora_checkpoint(tmp_path / "bad", model, cfg, LORA, with_entry=False)
    with pytest.raises(ValueError, match=r'state.json has no "lora"'):
        load_model(no_entry, "cpu")


def test_export_of_a_lora_run(tmp_path):
    """A run imported from a Hugging Face folder, a LoRA checkpoint on top: `kiln export --format hf` and `gguf`
    write the merged model, `--format peft` the adapter, which PEFT applies to the original folder."""
    from kiln.formats.gguf import read_gguf
    from test_import_export import hf_folder
    hf_folder(tmp_path / "hf", "llama-tied-gqa")
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "hf"), "--run_dir", str(run)]) == 0
    rd = RunDir(run)
    imported = latest_checkpoint(rd.checkpoints)
    assert main(["export", "--run_dir", str(run), "--format", "peft", "--checkpoint", str(imported)]) == 1

    base, cfg = load_model(imported, "cpu")
    model = base.train()
    apply_lora(model, LORA, "cpu")
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for k, t in lora_state_dict(model).items():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    model.eval()
    ckpt = lora_checkpoint(rd.checkpoints, model, checkpoint_config(imported), LORA, step=7)
    assert latest_checkpoint(rd.checkpoints) == ckpt
    x = ids(cfg.model)
    ours = kiln_logits(model, x)

    assert main(["export", "--run_dir", str(run), "--format", "hf", "--out", str(tmp_path / "merged")]) == 0
    assert (hf_logits(load_hf(tmp_path / "merged"), x) - ours).abs().max().item() <= 1e-4
    assert "LoRA | rank 4" in (tmp_path / "merged" / "README.md").read_text()

    assert main(["export", "--run_dir", str(run), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    theirs = peft.PeftModel.from_pretrained(load_hf(tmp_path / "hf"), tmp_path / "adapter").eval()
    assert (hf_logits(theirs, x) - ours).abs().max().item() <= 1e-4
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "the-base"

    gguf_path = tmp_path / "m.gguf"
    assert main(["export", "--run_dir", str(run), "--format", "gguf", "--quant", "f32", "--out", str(gguf_path)]) == 0
    back = read_gguf(gguf_path)
    assert (kiln_logits(model_from_state(cfg.model, back.state_dict).eval(), x) - ours).abs().max().item() <= 1e-4

import dataclasses
import math

import pytest

from kiln.config import (ConfigError, ModelConfig, TrainConfig, grad_accum_steps, load_recipe,
                         recipe_names, resolve_train)


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_validates(name):
    cfg = load_recipe(name)
    assert cfg.name == name
    m = cfg.model.resolved()
    assert m.n_heads * m.head_dim == m.d_model
    resolve_train(cfg.train, cfg.model)


def test_builtin_recipes_present():
    assert {"tiny", "gpt2-small"} <= set(recipe_names())


def test_gpt2_small_is_124m_class():
    import dataclasses
    cfg = load_recipe("gpt2-small")
    m = dataclasses.replace(cfg.model, vocab_size=cfg.tokenizer.vocab_size).resolved()
    assert (m.d_model, m.depth, m.n_heads, m.head_dim, m.max_seq_len) == (768, 12, 6, 128, 1024)
    # Count without allocating: embeddings (tied) + per-layer attention and SwiGLU + norms.
    per_layer = 4 * m.d_model ** 2 + 3 * m.d_model * m.ffn_hidden + 2 * m.d_model
    n = m.vocab_size * m.d_model + m.depth * per_layer + m.d_model
    assert 115e6 < n < 135e6
    assert grad_accum_steps(cfg.train, cfg.model) == 16


def test_depth_dial_derives_width_heads_ffn():
    m = ModelConfig(depth=6).resolved()
    assert m.d_model == 384 and m.n_heads == 6 and m.n_kv_heads == 6
    assert m.ffn_hidden % 64 == 0 and m.ffn_hidden >= 8 * 384 / 3


def test_explicit_values_win_over_derived():
    m = ModelConfig(depth=6, d_model=512, n_heads=8, n_kv_heads=2, ffn_hidden=1000).resolved()
    assert (m.d_model, m.n_heads, m.n_kv_heads, m.ffn_hidden) == (512, 8, 2, 1000)


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"train\.lrr.*Did you mean `train\.lr`"):
        load_recipe("tiny", {"train": {"lrr": 1.0}})


def test_bad_values_fail_at_load_with_key():
    with pytest.raises(ConfigError, match="model.n_kv_heads"):
        load_recipe("tiny", {"model": {"n_kv_heads": 3}})
    with pytest.raises(ConfigError, match="train.schedule"):
        load_recipe("tiny", {"train": {"schedule": "exp"}})
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_recipe("tiny", {"train": {"max_steps": "many"}})


def test_batch_tokens_must_divide():
    with pytest.raises(ConfigError, match="batch_tokens"):
        resolve_train(TrainConfig(micro_batch_size=4, batch_tokens=1000), ModelConfig(max_seq_len=64))
    t = resolve_train(TrainConfig(micro_batch_size=4, batch_tokens=4 * 64 * 3), ModelConfig(max_seq_len=64))
    assert t.batch_tokens == 768 and grad_accum_steps(t, ModelConfig(max_seq_len=64)) == 3


def test_rows_shorter_than_the_context_count_their_own_tokens():
    """Fine-tuning rows of 16 tokens on a model with a 64-token context: batch_tokens in rows of 16."""
    model = ModelConfig(max_seq_len=64)
    t = resolve_train(TrainConfig(micro_batch_size=4, seq_len=16), model)
    assert t.batch_tokens == 64 and grad_accum_steps(t, model) == 1
    t = resolve_train(TrainConfig(micro_batch_size=4, seq_len=16, batch_tokens=4 * 16 * 5), model)
    assert grad_accum_steps(t, model) == 5
    with pytest.raises(ConfigError, match="micro_batch_size \\* seq_len \\* world_size = 4 \\* 16"):
        resolve_train(TrainConfig(micro_batch_size=4, seq_len=16, batch_tokens=100), model)


def test_muon_runs_with_fsdp():
    assert load_recipe("gpt2-small", {"train": {"parallel": "fsdp"}}).train.optimizer == "muon"


def test_gpu_and_cpu_recipes_use_muon():
    assert load_recipe("gpt2-small").train.optimizer == "muon" and load_recipe("tiny").train.optimizer == "muon"


# ---------------------------------------------------------------- train.parallel=deepspeed (no DeepSpeed needed)

def _ds(tmp_path, user: dict | None = None, **train):
    import json
    over = {"parallel": "deepspeed", "optimizer": "adamw", **train}
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        over["deepspeed_config"] = str(path)
    return load_recipe("tiny", {"train": over})


def test_deepspeed_config_validates(tmp_path):
    t = _ds(tmp_path, {"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_clipping": "auto"},
            zero_stage=3).train
    assert t.parallel == "deepspeed" and t.zero_stage == 3
    assert _ds(tmp_path).train.zero_stage == 2    # the default


def test_deepspeed_refuses_muon_compile_and_bad_stage(tmp_path):
    with pytest.raises(ConfigError, match="train.optimizer=muon with train.parallel=deepspeed"):
        _ds(tmp_path, optimizer="muon")
    with pytest.raises(ConfigError, match="train.compile"):
        _ds(tmp_path, compile=True)
    with pytest.raises(ConfigError, match="train.zero_stage=4"):
        _ds(tmp_path, zero_stage=4)
    with pytest.raises(ConfigError, match="offload_optimizer"):
        _ds(tmp_path, cpu_offload=True)
    with pytest.raises(ConfigError, match="train.deepspeed_config is set but train.parallel='ddp'"):
        _ds(tmp_path, {}, parallel="ddp")
    with pytest.raises(ConfigError, match="train.fp8 with train.parallel=deepspeed"):
        _ds(tmp_path, fp8="tensorwise")


def test_fp8_is_a_choice_of_recipe():
    assert load_recipe("tiny", {"train": {"fp8": "rowwise"}}).train.fp8 == "rowwise"
    with pytest.raises(ConfigError, match="train.fp8"):
        load_recipe("tiny", {"train": {"fp8": "e4m3"}})


def test_deepspeed_json_contradicting_kiln_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r'"zero_optimization.stage" = 3 contradicts .*train.zero_stage'):
        _ds(tmp_path, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match=r'"gradient_clipping" = 0.5 contradicts .*train.grad_clip'):
        _ds(tmp_path, {"gradient_clipping": 0.5})
    with pytest.raises(ConfigError, match=r'"optimizer" section .* kiln builds AdamW'):
        _ds(tmp_path, {"optimizer": {"type": "Adam"}})
    with pytest.raises(ConfigError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_recipe("tiny", {"train": {"parallel": "deepspeed", "optimizer": "adamw",
                                       "deepspeed_config": str(tmp_path / "bad.json")}})


def test_deepspeed_full_config_merges_batch_precision_and_passes_the_rest(tmp_path):
    from kiln.config.deepspeed import deepspeed_config
    t = _ds(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000}, "train_batch_size": "auto",
                       "wall_clock_breakdown": True}).train
    c = deepspeed_config(t, micro_batch=4, accum=2, world_size=8, bf16=True)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (64, 4, 2)
    assert c["zero_optimization"] == {"reduce_bucket_size": 1000, "stage": 2}
    assert c["bf16"] == {"enabled": True, "check_grad_overflow": True} and c["wall_clock_breakdown"] is True
    t = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 8}).train
    with pytest.raises(ConfigError, match=r'"train_micro_batch_size_per_gpu" = 8 contradicts kiln\'s 4'):
        deepspeed_config(t, micro_batch=4, accum=2, world_size=8, bf16=False)


def test_deepspeed_missing_says_how_to_install(monkeypatch):
    import sys
    from kiln.train import zero
    monkeypatch.setitem(sys.modules, "deepspeed", None)    # import deepspeed -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'llmkiln\[deepspeed\]'"):
        zero.require()


def test_a_value_no_form_of_a_union_accepts_names_every_form():
    with pytest.raises(ConfigError, match=r"train.mfu_peak='fast' is not valid; choose one of 'datasheet', "
                                          r"'measured'; or train.mfu_peak must be a number"):
        load_recipe("tiny", {"train": {"mfu_peak": "fast"}})


@pytest.mark.parametrize("kw", [dict(depth=1, head_dim=32, n_kv_heads=1, vocab_size=384),
                                dict(depth=3, n_kv_heads=2, vocab_size=1000, tie_embeddings=False, qk_norm=True),
                                dict(depth=2, d_model=96, head_dim=16, n_heads=8, vocab_size=512)])
def test_parameter_count_by_arithmetic_matches_the_built_model(kw):
    from kiln.model.llama import Transformer
    cfg = ModelConfig(**kw)
    assert cfg.num_params() == Transformer(cfg).num_params()


def test_gpt2_small_derives_its_horizon_from_tokens_per_parameter():
    cfg = load_recipe("gpt2-small")
    assert cfg.train.max_steps is None and cfg.train.tokens_per_param == 20
    model = dataclasses.replace(cfg.model, vocab_size=50304).resolved()
    t = resolve_train(cfg.train, model)
    assert t.max_steps == math.ceil(20 * model.num_params() / 524288)   # ~124M x 20 tokens = ~4.7k steps
    assert 4000 < t.max_steps < 5500
    with pytest.raises(ConfigError, match="tokens_per_param must be > 0"):
        load_recipe("gpt2-small", {"train": {"tokens_per_param": 0}})
    # An explicit step count wins (a throughput run).
    assert resolve_train(load_recipe("gpt2-small", {"train": {"max_steps": 50}}).train, model).max_steps == 50


def test_the_model_vocabulary_is_rounded_with_the_tokenizer_multiple():
    from kiln.train.pretrain import resolved_config
    cfg = load_recipe("tiny", {"tokenizer": {"vocab_multiple": 128}})
    assert resolved_config(cfg, 300).model.vocab_size == 384
    assert resolved_config(load_recipe("tiny"), 300).model.vocab_size == 320


def test_volatile_training_fields_follow_the_dataclass():
    from kiln.pipeline import STAGES, fingerprint
    pretrain = next(s for s in STAGES if s.name == "pretrain")
    base = fingerprint(load_recipe("tiny"), pretrain)
    assert fingerprint(load_recipe("tiny", {"train": {"log_every": 3, "resume": True}}), pretrain) == base
    assert fingerprint(load_recipe("tiny", {"train": {"lr": 1e-3}}), pretrain) != base
    assert "log_every" not in base["train"] and "lr" in base["train"]

"""Several LoRA adapters over one base in one engine: each request's tokens equal those of its adapter merged into
the base alone (the reference), whatever shares its batch; the base stays served; bad adapters are refused."""

import copy

import pytest
import torch

from kiln.config import ModelConfig
from kiln.formats.peft import apply_adapter
from kiln.infer.adapters import AdapterBank
from kiln.infer.engine import Engine
from kiln.infer.generate import generate
from kiln.infer.sampling import SamplingParams
from kiln.model.llama import Transformer

from lorakit import random_adapter

PROMPTS = [[5], [1, 2, 3], [7, 7, 7, 7, 7, 9, 11], list(range(20, 40)), [3, 1, 4, 1, 5, 9, 2, 6]]
GREEDY = SamplingParams(max_tokens=16, temperature=0)


def make(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=89, max_seq_len=64,
                                init_std=0.3), **kw})
    return Transformer(cfg).eval()


def adapter(tmp_path, name, rank, targets, seed, model) -> str:
    """A PEFT adapter of `model` with random (large) factors, so that it changes the greedy tokens."""
    return random_adapter(tmp_path / name, model, rank, targets, seed, 0.3, "base")


@pytest.fixture
def three(tmp_path):
    base = make(qkv_bias=True)   # Qwen2's biases: the adapted q/k/v keep theirs
    dirs = {"math": adapter(tmp_path, "math", 4, ["q_proj", "v_proj", "o_proj", "down_proj"], 1, base),
            "chat": adapter(tmp_path, "chat", 8, ["gate_proj", "up_proj", "k_proj"], 2, base)}
    refs = {None: base}
    for name, d in dirs.items():
        refs[name] = copy.deepcopy(base)
        apply_adapter(refs[name], d)
    return base, dirs, refs


def test_each_request_gets_its_own_adapter_in_a_shared_batch(three):
    base, dirs, refs = three
    want = {name: [generate(m, p, 16, temperature=0, use_cache=False) for p in PROMPTS] for name, m in refs.items()}
    assert want["math"] != want[None] and want["chat"] != want[None]   # the adapters matter
    served = copy.deepcopy(base)
    bank = AdapterBank(served, dirs)
    assert bank.index(None) == 0 and bank.index("chat") == 2
    for slots in (1, 4, 16):
        engine = Engine(served, max_slots=slots, adapters=bank)
        got: dict = {}
        order = [(name, i) for i in range(len(PROMPTS)) for name in (None, "math", "chat")]   # interleaved

        def sink(key):
            def on_output(o):
                got.setdefault(key, []).extend(o.token_ids)
            return on_output
        for name, i in order:
            engine.submit(PROMPTS[i], GREEDY, sink((name, i)), adapter=bank.index(name))
        while engine.active_slots or engine.waiting:
            engine.step()
        for name, i in order:
            assert got[name, i] == want[name][i], (slots, name, i)


def test_the_prefix_cache_never_shares_keys_across_adapters(three):
    base, dirs, refs = three
    served = copy.deepcopy(base)
    bank = AdapterBank(served, dirs)
    engine = Engine(served, max_slots=2, adapters=bank)
    engine.min_prefix_tokens = 4
    prompt = list(range(10, 40))
    first = engine.generate([prompt], GREEDY)[0][0]   # the base's keys for `prompt` now sit in a free slot
    assert first == generate(refs[None], prompt, 16, temperature=0, use_cache=False)
    out: list[int] = []
    engine.submit(prompt, GREEDY, lambda o: out.extend(o.token_ids), adapter=bank.index("math"))
    while engine.active_slots or engine.waiting:
        engine.step()
    assert engine.stats["cached_prompt_tokens"] == 0
    assert out == generate(refs["math"], prompt, 16, temperature=0, use_cache=False)
    again: list[int] = []   # the same adapter again: its own cached prefix is used
    engine.submit(prompt, GREEDY, lambda o: again.extend(o.token_ids), adapter=bank.index("math"))
    while engine.active_slots or engine.waiting:
        engine.step()
    assert engine.stats["cached_prompt_tokens"] > 0 and again == out


def test_n_samples_and_sampling_follow_the_adapter(three):
    """n > 1 copies the prompt's slot: each copy keeps the request's adapter (seeded samples equal the merged
    model's in an engine of its own)."""
    base, dirs, refs = three
    served = copy.deepcopy(base)
    bank = AdapterBank(served, dirs)
    p = SamplingParams(max_tokens=12, temperature=0.9, seed=7, n=3)
    want = Engine(refs["chat"], max_slots=4).generate([PROMPTS[3]], p)
    out: dict = {}
    engine = Engine(served, max_slots=4, adapters=bank)
    engine.submit(PROMPTS[3], p, lambda o: out.setdefault(o.index, []).extend(o.token_ids), adapter=2)
    while engine.active_slots or engine.waiting:
        engine.step()
    assert [out[i] for i in range(3)] == want[0]


def test_bad_adapters_are_refused(three, tmp_path):
    base, dirs, _ = three
    other = make(d_model=32)
    wrong = adapter(tmp_path, "wrong", 4, ["q_proj"], 3, other)
    with pytest.raises(ValueError, match="q_proj.lora_A.weight has shape .4, 32.*adapter 'wrong' is of another model"):
        AdapterBank(copy.deepcopy(base), {"wrong": wrong})
    with pytest.raises(FileNotFoundError, match="no such directory"):
        AdapterBank(copy.deepcopy(base), {"gone": str(tmp_path / "nope")})
    served = copy.deepcopy(base)
    bank = AdapterBank(served, dirs)
    with pytest.raises(ValueError, match="compil"):
        Engine(served, max_slots=2, adapters=bank, compile=True)
    with pytest.raises(ValueError, match="adapter 3"):
        Engine(served, max_slots=2, adapters=bank).submit([1], GREEDY, lambda o: None, adapter=3)
    with pytest.raises(ValueError, match="adapter 1"):
        Engine(make(), max_slots=2).submit([1], GREEDY, lambda o: None, adapter=1)

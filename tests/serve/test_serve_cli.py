"""`kiln serve` and `kiln chat` as a user runs them: subprocesses on a real run directory."""

import signal
import sys
import time

import httpx
import pytest
import torch

from kiln.infer.engine import Engine
from kiln.infer.sampling import SamplingParams
from kiln.serve.loader import load_served
from kiln.config import Config
from servekit import free_port, make_run
from subprocess_util import run_child

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cli"), max_seq_len=128)


def greedy_reply(run, messages, max_tokens):
    cfg = Config(run_dir=str(run))
    cfg.serve.device = "cpu"
    served = load_served(cfg, start=False)
    tok = served.tokenizer
    engine = Engine(served.engine.model, tok, max_slots=1)
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    out = engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, stop_ids=tok.stop_ids))
    return tok.decode(out[0][0], skip_special=True)


@pytest.mark.timeout(120)
def test_kiln_serve_command(run, spawn):
    port = free_port()
    child = spawn([sys.executable, "-m", "kiln", "serve", "--run_dir", str(run), "--port", str(port),
                   "--serve.device", "cpu", "--model_name", "tiny-chat"], timeout=90)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert child.returncode is None and child.proc.poll() is None, child.stderr
        assert time.monotonic() < deadline, child.stdout + child.stderr
        time.sleep(0.2)
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == greedy_reply(run, messages, 8)
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0, child.stderr
    assert "model `tiny-chat`" in child.stdout


def test_kiln_serve_on_a_taken_port_says_so_before_loading(run, capsys):
    import socket

    from kiln.cli import main
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        assert main(["serve", "--run_dir", str(run), "--port", str(port), "--serve.device", "cpu"]) == 2
    finally:
        holder.close()
    out = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in out.err and "--port" in out.err and "serving" not in out.out
    assert main(["serve", "--run_dir", str(run), "--port", "70000"]) == 2
    assert "serve.port=70000" in capsys.readouterr().err


def test_served_model_with_a_peft_adapter_is_the_merged_model(run, tmp_path, capsys):
    """--adapter DIR (a PEFT LoRA adapter, as PEFT or `kiln export --format peft` writes it) is merged into the
    run's weights: the served model's greedy tokens are those of base + (alpha / r) B A computed here; an
    adapter of another shape is refused naming the tensor."""
    from kiln.cli import _expand, parse
    from kiln.config import LoRAConfig
    from kiln.formats.checkpoint import latest_checkpoint, load_model
    from kiln.formats.peft import merge_state, write_adapter
    from kiln.infer.generate import generate

    base, _ = load_model(latest_checkpoint(run / "checkpoints"), "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(base.cfg.depth):
        for group, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
            w = base.state_dict()[f"model.layers.{i}.{group}.{name}.weight"]
            tensors[f"model.layers.{i}.{group}.{name}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g)
            tensors[f"model.layers.{i}.{group}.{name}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g)
    lora = LoRAConfig(enabled=True, rank=4, alpha=8, targets=["q_proj", "down_proj"])
    adapter = write_adapter(tmp_path / "adapter", tensors, lora, str(run))
    cfg = parse("serve", _expand("serve", ["--run_dir", str(run), "--adapter", str(adapter), "--serve.device",
                                           "cpu"]))
    served = load_served(cfg, start=False)
    assert f"LoRA adapter {adapter} (rank 4, alpha 8" in capsys.readouterr().out
    want = _with_state(base, merge_state(base.state_dict(), tensors, 8, 4))
    prompt = [5, 6, 7, 8]
    got = Engine(served.engine.model, max_slots=1).generate([prompt], SamplingParams(max_tokens=8, temperature=0))
    assert got[0][0] == generate(want, prompt, 8, temperature=0, use_cache=False)
    assert got[0][0] != generate(base, prompt, 8, temperature=0, use_cache=False)
    bad = dict(tensors)
    bad["model.layers.0.mlp.down_proj.lora_B.weight"] = torch.randn(3, 4)
    write_adapter(tmp_path / "bad", bad, lora, str(run))
    cfg.serve.adapter = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="down_proj.weight .* does not fit its adapter"):
        load_served(cfg, start=False)


def test_a_context_beyond_the_models_is_cut_with_a_warning(run, capsys):
    cfg = Config(run_dir=str(run))
    cfg.serve.device, cfg.serve.max_len = "cpu", 100_000
    served = load_served(cfg, start=False)
    assert served.max_len == served.engine.model.cfg.max_seq_len == 128
    assert "serve.max_len=100000 is beyond the model's context of 128 positions" in capsys.readouterr().out


def _with_state(model, state):
    import copy
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


def test_kiln_serve_and_chat_help():
    for command in ("serve", "chat"):
        out = run_child([sys.executable, "-m", "kiln", command, "--help"], timeout=60)
        assert out.returncode == 0 and "--serve.max_batch" in out.stdout and "--serve.quantize" in out.stdout


def test_served_model_is_int8_when_asked(run, capsys):
    from kiln.infer.generate import generate
    from kiln.infer.quant import TARGETS, Int8Linear, int8_layers

    cfg = Config(run_dir=str(run))
    cfg.serve.device, cfg.serve.dtype, cfg.serve.quantize = "cpu", "bfloat16", "int8"
    model = load_served(cfg, start=False).engine.model
    assert len(int8_layers(model)) == model.cfg.depth * len(TARGETS) and not isinstance(model.lm_head, Int8Linear)
    out = capsys.readouterr().out
    assert out.count("int8 weight-only") == 1 and "torch._weight_int8pack_mm in 14" in out and "MiB -> " in out
    prompt = [5, 6, 7]
    got = Engine(model, max_slots=1).generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0][0]
    assert got == generate(model, prompt, 6, temperature=0, use_cache=False)


@pytest.mark.timeout(120)
def test_kiln_chat_keeps_history_and_resets(run, tmp_path):
    lines = ["Hello there", "How are you?", "/reset", "Hello there", "/exit"]
    (tmp_path / "stdin").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "stdin") as stdin:
        out = run_child([sys.executable, "-m", "kiln", "chat", "--run_dir", str(run), "--serve.device", "cpu",
                         "--temperature", "0", "--serve.max_tokens", "10"], timeout=90, stdin=stdin)
    assert out.returncode == 0, out.stderr
    first = greedy_reply(run, [{"role": "user", "content": "Hello there"}], 10)
    second = greedy_reply(run, [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "How are you?"}], 10)
    replies = [line.removeprefix("> ") for line in out.stdout.split("\n") if line.startswith("> ")]
    assert first and replies[:2] == [first, second]
    assert "(conversation cleared)" in out.stdout
    assert out.stdout.count(first) >= 2            # the same first turn again after /reset


def test_lora_flags_name_each_adapter(run):
    """`kiln serve --lora NAME=DIR` (repeatable) fills serve.lora_modules; an entry without a name, or a name used
    twice, is refused saying what is expected."""
    from kiln.cli import _expand, parse
    from kiln.config import ConfigError
    cfg = parse("serve", _expand("serve", ["--run_dir", str(run), "--lora", "math=/a", "--lora=chat=/b"]))
    assert cfg.serve.lora_dirs() == {"math": "/a", "chat": "/b"}
    for bad, says in ((["--lora", "/a"], "is not NAME=DIR"), (["--lora", "x=/a", "--lora", "x=/b"], "used twice")):
        with pytest.raises(ConfigError, match=says):
            parse("serve", _expand("serve", ["--run_dir", str(run), *bad]))
    for other in (["--serve.quantize", "int8"], ["--serve.compile", "true"]):
        cfg = parse("serve", _expand("serve", ["--run_dir", str(run), "--lora", "m=/a", "--serve.device", "cpu",
                                               *other]))
        with pytest.raises(ValueError, match="serve.lora_modules with serve.(quantize|compile): not supported"):
            load_served(cfg, start=False)
    # the base's own name (the run directory's, when --serve.model_name is not given) is not an adapter's
    cfg = parse("serve", _expand("serve", ["--run_dir", str(run), "--lora", f"{run.resolve().name}=/a",
                                           "--serve.device", "cpu"]))
    with pytest.raises(ValueError, match="is the base model's name"):
        load_served(cfg, start=False)

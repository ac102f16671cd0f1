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

from kiln.formats.gguf import read_gguf, write_gguf
from kiln.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf import TEXTS, kiln_tokenizer_dir, load, random_model, tiny_cfg  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="pip install llama-cpp-python (the test extra pulls it in)")

CHILD = r"""
import json, sys
import llama_cpp
path, texts, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = llama_cpp.Llama(path, n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                      type_k=0, type_v=0)   # type 0 = f32 KV cache: the default f16 cache would round K and V
tokens = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
specials = llm.tokenize("<|user|>\nhi<|end|>".encode(), add_bos=False, special=True)
llm.eval(ids)
scores = [list(map(float, row)) for row in llm.scores[:len(ids)]]
print(json.dumps({"tokens": tokens, "specials": specials, "scores": scores,
                  "eos": llm.token_eos(), "n_vocab": llm.n_vocab()}))
llm.close()
"""


def run_llama_cpp(path: Path, texts: list[str], ids: list[int]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(texts), json.dumps(ids)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == -signal.SIGILL:
        pytest.skip("this llama-cpp-python build uses CPU instructions this machine refuses: reinstall it with "
                    "CMAKE_ARGS='-DGGML_NATIVE=OFF'")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return kiln_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("cfg_kw", [dict(), dict(tie_embeddings=False, n_kv_heads=1),
                                    dict(qk_norm=True, n_heads=2, head_dim=48)],
                         ids=["llama-tied-gqa", "llama-untied-mqa", "qwen3-wide-heads"])
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_the_export(tmp_path, tok_dir, cfg_kw, quant):
    """Token ids equal kiln's on every text (special tokens parsed as one id each); logits equal kiln's model on
    the weights the file holds (for f16 and q8_0, kiln's model loaded back from the same file)."""
    model = random_model(tiny_cfg(448, **cfg_kw))
    path = tmp_path / f"m-{quant}.gguf"
    write_gguf(path, model.cfg, model.state_dict(), tok_dir, quant=quant)
    reference = model if quant == "f32" else load(read_gguf(path))
    tok = Tokenizer.from_file(tok_dir / "tokenizer.json")
    ids = tok.encode("def parse(x):\n    return x + 1  # 12345")
    out = run_llama_cpp(path, TEXTS, ids)

    assert out["tokens"] == [tok.encode(t) for t in TEXTS]
    assert out["specials"] == tok.encode_with_special("<|user|>\nhi<|end|>")
    assert out["eos"] == tok.eos_id and out["n_vocab"] == model.cfg.vocab_size
    with torch.no_grad():
        want = reference(torch.tensor([ids]))[0].float()
    got = torch.tensor(out["scores"])
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item(), quant
    assert torch.equal(got.argmax(-1), want.argmax(-1))

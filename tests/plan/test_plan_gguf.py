"""The estimator's GGUF figures against the files kiln's exporter writes, read back by `gguf.GGUFReader`:
every tensor's type and byte count, the whole tensor data, and the file size within a few percent (the
metadata is estimated, not counted). q4_k_m against llama.cpp's own quantiser where it is on PATH."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gguf
import pytest

from kiln.formats.gguf import write_gguf
from kiln.plan.gguf import ALIGNMENT, gguf_file_bytes, gguf_tensor_bytes, gguf_tensors, tensor_type

sys.path.insert(0, str(Path(__file__).parents[1] / "formats"))
from test_gguf import kiln_tokenizer_dir, random_model, tiny_cfg  # noqa: E402

# rows of 256 and 512 (k-quant blocks) and of 96 (fallbacks); tied and untied; Llama 3 rope factors
CFGS = {"tied-k-rows": dict(d_model=256, head_dim=64, ffn_hidden=512, depth=8),
        "untied-odd-rows": dict(d_model=96, head_dim=16, ffn_hidden=160, tie_embeddings=False),
        "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return kiln_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def check_against_file(path: Path, cfg, quant: str) -> None:
    c = cfg.resolved()
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert sorted(tensors) == sorted(name for name, _ in gguf_tensors(c))   # llama-quantize reorders them
    for name, shape in gguf_tensors(c):
        t = tensors[name]
        assert t.tensor_type.name.lower() == tensor_type(name, shape, quant, c.depth, c.tie_embeddings), name
        assert int(t.n_bytes) == gguf_tensor_bytes(shape, quant, name, c.depth, c.tie_embeddings), name
    size = path.stat().st_size
    predicted = gguf_file_bytes(c, quant)
    assert abs(predicted - size) <= 0.1 * size + 4 * ALIGNMENT, (predicted, size)


@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q4_1"])
def test_estimate_equals_the_exported_file(tmp_path, tok_dir, name, quant):
    model = random_model(tiny_cfg(448, **CFGS[name]))
    path = tmp_path / f"{name}-{quant}.gguf"
    write_gguf(path, model.cfg, model.state_dict(), tok_dir, quant=quant)
    check_against_file(path, model.cfg, quant)


@pytest.mark.skipif(shutil.which("llama-quantize") is None, reason="llama.cpp's llama-quantize is not on PATH")
@pytest.mark.parametrize("name", ["tied-k-rows", "untied-odd-rows"])
def test_q4_k_m_estimate_equals_llama_quantize(tmp_path, tok_dir, name):
    model = random_model(tiny_cfg(448, **CFGS[name]))
    path = tmp_path / f"{name}-q4_k_m.gguf"
    write_gguf(path, model.cfg, model.state_dict(), tok_dir, quant="q4_k_m")
    check_against_file(path, model.cfg, "q4_k_m")

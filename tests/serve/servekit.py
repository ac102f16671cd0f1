"""A tiny random model in a real run directory (kiln's tokenizer and chat template), and `kiln serve`'s app on
uvicorn on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

from kiln.config import Config, ModelConfig
from kiln.config.rundir import RunDir
from kiln.config.stages import ServeConfig
from kiln.formats.hf import hf_state_dict
from kiln.formats.imported import ImportedModel
from kiln.formats.importer import write_run
from kiln.model.llama import Transformer
from kiln.serve.app import build_app
from kiln.serve.loader import load_served
from kiln.tokenizer.special import special_tokens
from kiln.tokenizer.train import train_bpe, write_hf_configs

TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "Hello, how are you today?",
         "A quick brown fox jumps over the lazy dog.", "Numbers: 1 2 3 42 1000", "Ünïcödé — ✓ 😀"]


def make_run(root: Path, max_seq_len: int = 96) -> Path:
    """A run directory as `kiln import` writes one: kiln-format tokenizer, random weights at step 0.

    The head's rows of special tokens are zeroed so the random model rarely stops by itself (replies have
    text), while greedy decoding stays deterministic."""
    tok = train_bpe(iter([TEXTS * 30]), vocab_size=320, min_frequency=2, n_reserved=4)
    tmp = root / "tok"
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    write_hf_configs(tmp, tok, n_reserved=4, model_max_length=max_seq_len)
    n_special = len(special_tokens(4))
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=tok.get_vocab_size(),
                      max_seq_len=max_seq_len, init_std=0.3, tie_embeddings=False)
    model = Transformer(cfg.resolved()).eval()
    with torch.no_grad():
        model.lm_head.weight[:n_special] = 0
    imported = ImportedModel(
        model={f.name: getattr(model.cfg, f.name) for f in dataclasses.fields(model.cfg)},
        state_dict={k: v.clone() for k, v in hf_state_dict(model).items()},
        tokenizer_json=(tmp / "tokenizer.json").read_text(), tokenizer_config=_read(tmp / "tokenizer_config.json"),
        generation={}, source="tests/serve", architecture="llama")
    run = root / "run"
    write_run(imported, RunDir(run), Config(run_dir=str(run)), max_shard_bytes=1 << 30)
    return run


def _read(path: Path) -> dict:
    import json
    return json.loads(path.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kiln serve` on a loopback port in a thread; `url` is the API base (…/v1)."""

    def __init__(self, run: Path, **serve):
        self.port = free_port()
        cfg = Config(run_dir=str(run))
        cfg.serve = dataclasses.replace(ServeConfig(), port=self.port, device="cpu", **serve)
        self.served = load_served(cfg, start=False)
        self.app = build_app(self.served, cfg.serve)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        with contextlib.suppress(Exception):
            self.served.engine.stop()

    @property
    def engine(self):
        return self.served.engine

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus metric's samples whose labels include `labels`."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families
        total, found = 0.0, False
        for family in text_string_to_metric_families(httpx.get(self.base + "/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total, found = total + sample.value, True
        if not found:
            raise KeyError(f"{name} {labels}")
        return total

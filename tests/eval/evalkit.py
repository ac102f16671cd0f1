"""A tiny trained tokenizer and a random kiln model for the eval tests (built in well under a second)."""

import functools

import torch

from kiln.config import ModelConfig
from kiln.model.llama import Transformer
from kiln.tokenizer import Tokenizer
from kiln.tokenizer.train import train_bpe

TEXTS = ["The following are multiple choice questions (with answers) about physics.",
         "Question: What is the capital of France?\nAnswer: Paris", "A. one\nB. two\nC. three\nD. four",
         "def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 3,
         "Alice had 3 apples and bought 5 more, so she has 8 apples. #### 8"]


@functools.lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    return Tokenizer(train_bpe(iter([TEXTS * 4]), vocab_size=420, min_frequency=1, n_reserved=4))


def model(vocab_size: int, max_seq_len: int = 96, seed: int = 0, **kw) -> Transformer:
    """Random weights large enough that log-probabilities differ clearly between choices."""
    torch.manual_seed(seed)
    cfg = ModelConfig(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=vocab_size,
                      max_seq_len=max_seq_len, init_std=0.3, **kw)
    return Transformer(cfg).eval()

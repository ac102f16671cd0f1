"""Tokenizer stage (train a byte-level BPE) and tokenize stage (encode the splits into token shards)."""

from kiln.tokenizer.core import Tokenizer
from kiln.tokenizer.tokenize import run_tokenize
from kiln.tokenizer.train import run_tokenizer

__all__ = ["Tokenizer", "run_tokenize", "run_tokenizer"]

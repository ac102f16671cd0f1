"""Tokenizer stage (train a byte-level BPE: kiln.tokenizer.train) and tokenize stage (encode the splits into token
shards: kiln.tokenizer.tokenize). Only the Tokenizer is imported here: post-training, serving and evaluation use
it without the stages' Parquet machinery."""

from kiln.tokenizer.core import Tokenizer

__all__ = ["Tokenizer"]

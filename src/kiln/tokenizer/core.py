"""`Tokenizer`: the thin wrapper every stage uses over a trained `tokenizer.json`.

Special tokens and user text: `tokenizers` matches added-token strings inside
any input, even with `add_special_tokens=False` (that flag only controls the
post-processor). So a document containing the text `<|end|>` would silently
become the end-of-turn id. The wrapper sets the library's
`encode_special_tokens = True`, which makes `encode` treat such strings as
ordinary text; special ids come only from `add_bos` / `add_eos` /
`encode_chat`. The `tokenizer.json` on disk keeps the library default, so
`transformers` still maps the markers of its rendered chat template to
special ids; for text without marker strings both give the same ids.

Round-trip contract (byte fallback): every one of the 256 bytes is a token, so
- `decode_bytes(encode_bytes(b)) == b` for ANY bytes `b`, valid UTF-8 or not;
- `decode(encode(s)) == s` for ANY Python `str`, including lone surrogates
  (U+D800..U+DFFF, which a `str` may hold but UTF-8 cannot). A lone surrogate
  is carried as the three bytes of its "surrogatepass" encoding (ED A0..BF xx,
  as in WTF-8/CESU-8); those byte triples never occur in valid UTF-8, so
  `decode` maps them back to the same surrogate and nothing else changes.
  Valid text never takes this path and gives the same ids as `tokenizers`
  and `transformers`, which reject lone surrogates outright.
- `decode` of an arbitrary id sequence never raises: bytes that are not
  valid UTF-8 (a cut through a character, say) become U+FFFD.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import pre_tokenizers

from kiln.tokenizer.special import BOS, EOS, PAD, chat_segments

_SURROGATE = re.compile("[\ud800-\udfff]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the one `pre_tokenizers.ByteLevel` uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """A byte-level BPE tokenizer: plain-text encoding, decoding, special ids, bytes per token."""

    def __init__(self, tok: tokenizers.Tokenizer, path: Path | None = None):
        self.path = path
        self._tok = tok
        self._tok.encode_special_tokens = True   # user text never yields special ids (see module docstring)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        missing = [t for t in (BOS, EOS, PAD) if t not in self._special]
        if missing:
            raise ValueError(f"{path or 'tokenizer'} has no special token(s) {', '.join(missing)}; "
                             "it was not made by `kiln tokenizer` (re-run it)")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, or the `tokenizer.json` inside a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run `kiln tokenizer` first")
        return cls(tokenizers.Tokenizer.from_file(str(path)), path)

    # ------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if _SURROGATE.search(text):
            return self._wrap(self._encode_surrogates(text, escaped=False), add_bos, add_eos)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Encode many texts at once on `tokenizers`' thread pool (RAYON_NUM_THREADS bounds it)."""
        texts = list(texts)
        odd = {i: t for i, t in enumerate(texts) if _SURROGATE.search(t)}   # tokenizers would raise on these
        plain = [("" if i in odd else t) for i, t in enumerate(texts)] if odd else texts
        # encode_batch_fast skips offset tracking, which we never use: ~1.6x faster.
        out = [e.ids for e in self._tok.encode_batch_fast(plain, add_special_tokens=False)]
        for i, t in odd.items():
            out[i] = self._encode_surrogates(t, escaped=False)
        return [self._wrap(ids, add_bos, add_eos) for ids in out]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids of arbitrary bytes: valid UTF-8 runs as text, every other byte as its byte token."""
        return self._encode_surrogates(data.decode("utf-8", errors="surrogateescape"), escaped=True)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes a sequence of ids stands for (special tokens as their UTF-8 text)."""
        table = self._bytes_table
        return b"".join(table[i] for i in ids)

    def _encode_surrogates(self, text: str, escaped: bool) -> list[int]:
        """Text runs through the tokenizer; each surrogate as byte tokens: with `escaped`, U+DC80+b is the
        raw byte b (Python's surrogateescape); otherwise its 3-byte surrogatepass encoding."""
        ids: list[int] = []
        pos = 0
        for m in _SURROGATE.finditer(text):
            if m.start() > pos:
                ids += self._tok.encode(text[pos:m.start()], add_special_tokens=False).ids
            c = ord(m.group())
            raw = bytes([c - 0xDC00]) if escaped and 0xDC80 <= c <= 0xDCFF else \
                m.group().encode("utf-8", errors="surrogatepass")
            ids += [self._byte_ids[b] for b in raw]
            pos = m.end()
        if pos < len(text):
            ids += self._tok.encode(text[pos:], add_special_tokens=False).ids
        return ids

    @cached_property
    def _byte_ids(self) -> list[int]:
        """Id of the single-byte token of each byte value."""
        out = []
        for b, ch in bytes_to_unicode().items():
            i = self._tok.token_to_id(ch)
            if i is None:
                raise ValueError(f"{self.path or 'tokenizer'} has no token for byte {b:#04x}; it is not a "
                                 "byte-level BPE made by `kiln tokenizer`")
            out.append((b, i))
        return [i for _, i in sorted(out)]

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        """Bytes of every id: byte-level tokens mapped back through bytes_to_unicode, added tokens as UTF-8."""
        back = {ch: b for b, ch in bytes_to_unicode().items()}
        added = self._tok.get_added_tokens_decoder()
        table = []
        for i in range(self.vocab_size):
            if i in added:
                table.append(added[i].content.encode("utf-8"))
            else:
                token = self._tok.id_to_token(i)
                table.append(bytes(back[c] for c in token))
        return table

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> list[int]:
        """A conversation in the chat format (see `special.py`): markers as special ids, content as plain text."""
        ids: list[int] = []
        for is_special, text in chat_segments(messages, add_generation_prompt):
            ids += [self._special[text]] if is_special else self.encode(text)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = list(ids)
        text = self._tok.decode(ids, skip_special_tokens=skip_special)
        if "\ufffd" not in text:
            return text
        # Invalid UTF-8 somewhere: lone surrogates (from encode) come back through surrogatepass; any other
        # bad bytes (a cut through a character) stay U+FFFD, as `tokenizers` gives them.
        special = set(self._special.values()) if skip_special else set()
        data = b"".join(self._bytes_table[i] for i in ids if i not in special and 0 <= i < self.vocab_size)
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:
            return text

    def decode_batch(self, batch: Sequence[Iterable[int]], skip_special: bool = False) -> list[str]:
        batch = [list(ids) for ids in batch]
        texts = self._tok.decode_batch(batch, skip_special_tokens=skip_special)
        return [self.decode(ids, skip_special) if "\ufffd" in t else t for ids, t in zip(batch, texts)]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    # ------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special[BOS]

    @property
    def eos_id(self) -> int:
        return self._special[EOS]

    @property
    def pad_id(self) -> int:
        return self._special[PAD]

    @property
    def special_ids(self) -> dict[str, int]:
        """Every special token's string and id, in id order."""
        return dict(sorted(self._special.items(), key=lambda kv: kv[1]))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for, shape (vocab_size,), int64; 0 for special tokens.

        Bits per byte = sum of per-token losses (nats) / ln 2 / sum of token_bytes[targets].
        """
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        added = self._tok.get_added_tokens_decoder()
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i in added:
                t = added[i]
                out[i] = 0 if t.special else len(t.content.encode("utf-8"))
                continue
            token = self._tok.id_to_token(i)
            # In a byte-level BPE each character of a vocabulary entry stands for exactly one byte.
            if token is None or not set(token) <= alphabet:
                raise ValueError(f"{self.path or 'tokenizer'}: token {i} ({token!r}) is not byte-level; "
                                 "token_bytes() needs a byte-level BPE made by `kiln tokenizer`")
            out[i] = len(token)
        return out

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (with encode_special_tokens set)."""
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"

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

Imported tokenizers (`kiln import`): the special tokens, whether BOS is
prepended, the chat template and the stop ids come from the
`tokenizer_config.json` and `generation_config.json` beside `tokenizer.json`,
as the model's family defines them (Llama 3's `<|begin_of_text|>`, Qwen3's
missing BOS, ChatML's `<|im_end|>`). A chat template other than kiln's is
rendered with Jinja as `transformers` renders it and the text is encoded
with special tokens recognised (as `apply_chat_template` does), so markers
that a user types inside a message do become special ids there; kiln's own
format keeps content as plain text. Byte-level BPE and SentencePiece-style
byte fallback (`<0x0A>`) vocabularies both map every token to its bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from kiln.config.rundir import read_json
from kiln.tokenizer.special import BOS, CHAT_TEMPLATE, END, EOS, PAD, chat_segments

_SURROGATE = re.compile("[\ud800-\udfff]")
_SPM_SPACE = "\u2581"                                 # SentencePiece's word boundary: a space
_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")     # SentencePiece byte fallback token


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
    """A BPE tokenizer: plain-text encoding, decoding, chat rendering, special and stop ids, bytes per token."""

    def __init__(self, tok: tokenizers.Tokenizer, path: Path | None = None, config: Mapping[str, Any] | None = None,
                 generation: Mapping[str, Any] | None = None):
        self.path = path
        self._tok = tok
        self._tok.encode_special_tokens = True   # user text never yields special ids (see module docstring)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.config = dict(config or {})
        self.generation = dict(generation or {})
        where = path or "tokenizer"
        self.kiln_format = all(t in self._special for t in (BOS, EOS, PAD)) and \
            self.config.get("chat_template", CHAT_TEMPLATE) == CHAT_TEMPLATE
        if self.kiln_format:
            self._bos, self._eos, self._pad = self._special[BOS], self._special[EOS], self._special[PAD]
            self.add_bos_token = True
            self.chat_template: str | None = CHAT_TEMPLATE
            return
        if not self.config:
            raise ValueError(f"{where} has none of kiln's special tokens ({BOS}, {EOS}, {PAD}) and no "
                             "tokenizer_config.json beside it naming its own; re-run `kiln tokenizer`, or "
                             "`kiln import` the model it belongs to")
        self._bos = self._config_token_id("bos_token")
        self._eos = self._config_token_id("eos_token")
        if self._eos is None:
            ids = _id_list(self.generation.get("eos_token_id"))
            if not ids:
                raise ValueError(f"{where}: tokenizer_config.json names no eos_token and generation_config.json "
                                 "no eos_token_id; kiln needs an end-of-text token")
            self._eos = ids[0]
        self._pad = self._config_token_id("pad_token")
        self.add_bos_token = bool(self.config.get("add_bos_token", self._post_processor_adds_bos()))
        self.chat_template = _template_of(self.config.get("chat_template"))

    def _config_token_id(self, key: str) -> int | None:
        """Id of the token tokenizer_config.json names under `key` (a string, or an AddedToken dict)."""
        value = self.config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if value is None:
            return None
        i = self._tok.token_to_id(value)
        if i is None:
            raise ValueError(f"{self.path or 'tokenizer'}: tokenizer_config.json {key} {value!r} is not in the "
                             "vocabulary")
        return i

    def _post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor prepends BOS (Llama 3 says so only there)."""
        if self._bos is None:
            return False
        return self._tok.encode("a", add_special_tokens=True).ids[:1] == [self._bos]

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (or the one inside a directory), with the `tokenizer_config.json` and
        `generation_config.json` beside it when they exist."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run `kiln tokenizer` (or `kiln import`) first")
        return cls(tokenizers.Tokenizer.from_file(str(path)), path, read_json(path.parent / "tokenizer_config.json"),
                   read_json(path.parent / "generation_config.json"))

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
        """Id of the single-byte token of each byte value (byte-level BPE, or SentencePiece byte fallback)."""
        if self._spm:
            ids = [self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        else:
            ids = [self._tok.token_to_id(bytes_to_unicode()[b]) for b in range(256)]
        if None in ids:
            raise ValueError(f"{self.path or 'tokenizer'} has no token for byte {ids.index(None):#04x}; it cannot "
                             "encode arbitrary bytes (not a byte-level BPE, no byte fallback)")
        return ids

    @cached_property
    def _spm(self) -> bool:
        """SentencePiece-style vocabulary (`▁` for spaces, `<0xNN>` byte fallback) rather than byte-level."""
        return self._tok.token_to_id("<0x0A>") is not None and self._tok.token_to_id("\u010a") is None

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        """Bytes of every id: byte-level tokens mapped back through bytes_to_unicode (SentencePiece ones with
        `▁` as a space and `<0xNN>` as that byte), added tokens as UTF-8."""
        back = {ch: b for b, ch in bytes_to_unicode().items()}
        added = self._tok.get_added_tokens_decoder()
        table = []
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if i in added or token is None:
                table.append((added[i].content if i in added else "").encode("utf-8"))
            elif self._spm:
                m = _SPM_BYTE.match(token)
                table.append(bytes([int(m.group(1), 16)]) if m else token.replace(_SPM_SPACE, " ").encode("utf-8"))
            elif all(c in back for c in token):
                table.append(bytes(back[c] for c in token))
            else:
                raise ValueError(f"{self.path or 'tokenizer'}: token {i} ({token!r}) is neither byte-level nor "
                                 "SentencePiece; kiln cannot tell the bytes it stands for")
        return table

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> list[int]:
        """A conversation in the model's chat format. kiln's format: markers as special ids, content as plain
        text; an imported template: rendered, then encoded with special tokens recognised (as transformers)."""
        if self.kiln_format:
            ids: list[int] = []
            for is_special, text in chat_segments(messages, add_generation_prompt):
                ids += [self._special[text]] if is_special else self.encode(text)
            return ids
        return self.encode_with_special(self.render_chat(messages, add_generation_prompt))

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template renders it (the string `apply_chat_template` gives)."""
        if self.chat_template is None:
            raise ValueError(f"{self.path or 'tokenizer'} has no chat template (tokenizer_config.json "
                             "chat_template): this is a base model; fine-tune it with `kiln sft` or give a template")
        from kiln.tokenizer.chat_template import render
        tokens = {"bos_token": self._token_text(self._bos), "eos_token": self._token_text(self._eos)}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = self.config.get(key)
            value = value.get("content") if isinstance(value, Mapping) else value
            if isinstance(value, str):
                tokens[key] = value
        return render(self.chat_template, messages, add_generation_prompt, **tokens)

    def encode_with_special(self, text: str) -> list[int]:
        """Ids of `text` where special-token strings become their ids (a rendered chat template, say)."""
        return self._special_backend.encode(text, add_special_tokens=False).ids

    @cached_property
    def _special_backend(self) -> tokenizers.Tokenizer:
        # A second backend: flipping encode_special_tokens on the shared one would race between threads.
        tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = False
        tok.no_padding()
        tok.no_truncation()
        return tok

    def _token_text(self, i: int | None) -> str:
        return "" if i is None else self._tok.id_to_token(i)

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
    def bos_id(self) -> int | None:
        """The beginning-of-text id; None for families without one (Qwen3)."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """The end-of-text id: kiln's document separator, an imported model's eos_token."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """The padding id (the EOS id when the family defines none; padded targets are masked anyway)."""
        return self._eos if self._pad is None else self._pad

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply: EOS, the end-of-turn token (kiln's `<|end|>`), and every eos_token_id of an
        imported model's generation_config.json (Llama 3 lists `<|eot_id|>` there)."""
        ids = [self._eos]
        if self.kiln_format:
            ids.append(self._special[END])
        ids += _id_list(self.generation.get("eos_token_id"))
        return tuple(dict.fromkeys(ids))

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
        out = np.array([len(b) for b in self._bytes_table], dtype=np.int64)
        for i, t in self._tok.get_added_tokens_decoder().items():
            if t.special and i < len(out):
                out[i] = 0
        return out

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (with encode_special_tokens set)."""
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"


def _id_list(value: Any) -> list[int]:
    """generation_config's eos_token_id: an int, a list of ints, or absent."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _template_of(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of named templates (the `default` one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        return named.get("default") or next(iter(named.values()), None)
    return value

"""The tokenizer half of a GGUF file: `tokenizer.ggml.*` fields to a `tokenizers` tokenizer.json, and back.

A GGUF file carries no tokenizer.json: a byte-level BPE is stored as its tokens, token types, merges and a
*name* for its pre-tokenizer (`tokenizer.ggml.pre`), which llama.cpp maps to a hard-coded list of split regexes
(src/llama-vocab.cpp). Both directions therefore go through one table, PRE_TOKENIZERS: a name, the regexes
that name stands for (in the form a Hugging Face tokenizer.json holds them, which `tokenizers` runs), and
whether llama.cpp skips the merges for a word that is a token already (`ignore_merges`).

llama.cpp applies a list of regexes one after another, each splitting every piece into matches and the text
between them; `tokenizers`' Split with behavior "isolated" does the same, so a list of regexes becomes a
Sequence of Splits followed by the byte-to-character mapping (ByteLevel without its own regex).

SentencePiece vocabularies (`tokenizer.ggml.model` "llama": Llama 2, Mistral v0.1, TinyLlama) carry pieces
and scores, no merges. llama.cpp tokenises them as SentencePiece's BPE does: spaces become `▁` (one is
prepended unless `add_space_prefix` is false), then the adjacent pair whose concatenation is a piece with the
highest score merges first, and what no piece covers falls back to `<0xNN>` byte tokens. A BPE whose
merges are every split of every piece, ranked by that piece's score, makes the same choices; that is the
tokenizer.json transformers' Llama converter builds too. Import only: export writes byte-level BPE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from kiln.config.patterns import GPT4, PATTERNS
from kiln.tokenizer.special import END

GPT2_SPLIT = PATTERNS["gpt2"]           # also the regex built into tokenizers' ByteLevel(use_regex=True)
QWEN2_SPLIT = PATTERNS["gpt4-digits"]   # Qwen2's split: GPT-4's with single digits
# llama.cpp's "default" BPE pre-tokenizer: its own four regexes, applied in turn.
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                  r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[str, ...]
    """Regexes applied in turn (tokenizers' Split, behavior "isolated")."""
    ignore_merges: bool
    """llama.cpp emits a word that is in the vocabulary as one token without applying merges."""
    aliases: tuple[str, ...] = ()
    """Other `tokenizer.ggml.pre` names llama.cpp treats the same way."""


# The names llama.cpp (llama-vocab.cpp, 2026) maps to these splits; export writes the key of the entry.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "llama-bpe": PreTokenizer((GPT4,), True, ("llama3", "llama-v3", "falcon3", "pixtral")),
    "dbrx": PreTokenizer((GPT4,), False, ("smaug-bpe",)),
    "qwen2": PreTokenizer((QWEN2_SPLIT,), False, ("deepseek-r1-qwen", "megrez")),
    "gpt-2": PreTokenizer((GPT2_SPLIT,), False, ("phi-2",)),
    "smollm": PreTokenizer((r"\p{N}", GPT2_SPLIT), False,
                           ("starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")),
    "default": PreTokenizer(DEFAULT_SPLITS, False),
}
_BY_NAME = {alias: pre for name, pre in PRE_TOKENIZERS.items() for alias in (name, *pre.aliases)}

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Control tokens that close a turn, by name (a subset of llama.cpp's end-of-generation list): stop ids too.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", END, "<end_of_turn>", "<|eom_id|>")
PAD_PREFIX = "[PAD"   # rows past the tokenizer's vocabulary, as llama.cpp's converter names them


def known_pre_names() -> list[str]:
    return sorted(_BY_NAME)


# ---------------------------------------------------------------- GGUF -> tokenizer.json

def tokenizer_from_gguf(fields: dict[str, Any], source: str, max_len: int) -> tuple[str, dict, dict]:
    """(tokenizer_json, tokenizer_config, generation) from the `tokenizer.*` fields of a GGUF file."""
    kind = fields.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{source}: tokenizer.ggml.model {kind!r} is not supported; kiln reads byte-level BPE "
                         "('gpt2': Llama 3, Qwen, SmolLM2, kiln's own) and SentencePiece BPE ('llama': Llama 2, "
                         "Mistral v0.1)")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    while tokens and types[-1] == UNUSED and tokens[-1].startswith(PAD_PREFIX):  # embedding padding rows
        tokens.pop(), types.pop()
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"{source}: token {t!r} appears twice in tokenizer.ggml.tokens (ids {vocab[t]} "
                             f"and {i}); a tokenizer.json vocabulary cannot hold that")
        vocab[t] = i
    if kind == "llama":
        tok, default_bos = _sentencepiece_bpe(fields, tokens, types, vocab, source), True
    else:
        tok, default_bos = _byte_level_bpe(fields, vocab, source)
    # llama.cpp matches control and user-defined tokens whole before splitting: so do added tokens.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                    if ty == USER_DEFINED])

    def token(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}")
        if i is None or not 0 <= i < len(tokens):
            return None
        return tokens[i]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    # llama.cpp's defaults where the flags are absent: BOS for SentencePiece and the llama3 family, never EOS.
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", default_bos and bos is not None))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _post_processor(vocab, bos if add_bos else None, eos if add_eos else None, source)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    if fields.get("tokenizer.chat_template"):
        config["chat_template"] = fields["tokenizer.chat_template"]
    stops = [fields.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    stops += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in END_OF_TURN]
    stops = list(dict.fromkeys(i for i in stops if i is not None))
    generation = {"bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
                  "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
                  "pad_token_id": fields.get("tokenizer.ggml.padding_token_id")}
    return tok.to_str(), config, generation


def _byte_level_bpe(fields: dict[str, Any], vocab: dict[str, int], source: str) -> tuple[Tokenizer, bool]:
    """The byte-level BPE of a 'gpt2' vocabulary, and whether llama.cpp adds BOS when the file does not say."""
    pre_name = fields.get("tokenizer.ggml.pre") or "default"
    pre = _BY_NAME.get(pre_name)
    if pre is None:
        raise ValueError(f"{source}: tokenizer.ggml.pre {pre_name!r} is not a pre-tokenizer kiln can rebuild; "
                         f"known: {', '.join(known_pre_names())}")
    merges = []
    for i, m in enumerate(fields.get("tokenizer.ggml.merges") or []):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{source}: tokenizer.ggml.merges[{i}] = {m!r} is not two tokens split by one space")
        merges.append((pair[0], pair[1]))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges, fuse_unk=False))
    except Exception as e:   # tokenizers raises its own Exception for a merge of unknown tokens
        raise ValueError(f"{source}: the merges do not fit the tokens: {e}") from None
    tok.pre_tokenizer = splitter(pre.splits)
    tok.decoder = decoders.ByteLevel()
    return tok, pre.ignore_merges   # llama.cpp adds BOS by default for the llama3 family


SPM_SPACE = "\u2581"


def _sentencepiece_bpe(fields: dict[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int],
                       source: str) -> Tokenizer:
    """A 'llama' (SentencePiece BPE) vocabulary as a tokenizers BPE: merges from the pieces' scores."""
    scores = list(fields.get("tokenizer.ggml.scores") or [])
    if len(scores) < len(tokens):
        raise ValueError(f"{source}: a SentencePiece vocabulary needs tokenizer.ggml.scores for every token "
                         f"({len(scores)} scores for {len(tokens)} tokens)")
    # Every split of a mergeable piece into two pieces, the highest-scoring result first (SentencePiece's and
    # llama.cpp's order); ties by the halves' ids, as transformers' converter orders them.
    ranked = []
    for piece, i in vocab.items():
        if types[i] not in (NORMAL, USER_DEFINED) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], vocab[a], vocab[b], a, b))
    ranked.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk,
                                   fuse_unk=True, byte_fallback=has_bytes))
    except Exception as e:
        raise ValueError(f"{source}: cannot build a BPE from the SentencePiece pieces: {e}") from None
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPM_SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPM_SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def splitter(splits: tuple[str, ...]) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer for llama.cpp's list of regexes: one isolating Split each, then bytes to characters.
    The same construction as kiln's own tokenizers (kiln/tokenizer/train.py), so its JSON compares equal."""
    return pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in splits),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _post_processor(vocab: dict[str, int], bos: str | None, eos: str | None, source: str):
    if bos is None and eos is None:
        return None
    for t in (bos, eos):
        if t is not None and t not in vocab:
            raise ValueError(f"{source}: special token {t!r} is not in the vocabulary")
    head = [f"{bos}:0"] if bos else []
    tail = [f"{eos}:0"] if eos else []
    return processors.TemplateProcessing(
        single=[*head, "$A:0", *tail], pair=[*head, "$A:0", *tail, *head, "$B:1", *tail],
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(x for x in (bos, eos) if x)])


# ---------------------------------------------------------------- tokenizer.json -> GGUF

@dataclass
class GGUFVocab:
    """What write_gguf stores under `tokenizer.*`."""
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]    # bos / eos / padding / unknown / eot -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def vocab_for_gguf(tokenizer_dir: Path, vocab_size: int, generation: dict | None = None) -> GGUFVocab:
    """Read an HF tokenizer folder (tokenizer.json + tokenizer_config.json) as GGUF tokenizer fields; rows past
    the tokenizer's vocabulary up to the model's `vocab_size` become unused `[PADn]` tokens."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: GGUF export needs the run's tokenizer/ folder")
    tj = json.loads(path.read_text(encoding="utf-8"))
    cfg_path = Path(tokenizer_dir) / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or tj.get("normalizer") or \
            (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: only a byte-level BPE without a normalizer can be written to GGUF "
                         f"(model {model.get('type')}, normalizer {(tj.get('normalizer') or {}).get('type')}, "
                         f"decoder {(tj.get('decoder') or {}).get('type')})")
    id_to_token = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    id_to_token.update({i: a["content"] for i, a in added.items()})
    n = len(id_to_token)
    if sorted(id_to_token) != list(range(n)):
        gap = next(i for i in range(n) if i not in id_to_token)
        raise ValueError(f"{path}: token ids are not contiguous (no token has id {gap}); GGUF lists tokens by id")
    if n > vocab_size:
        raise ValueError(f"{path}: the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    tokens = [id_to_token[i] for i in range(n)] + [f"{PAD_PREFIX}{i}]" for i in range(n, vocab_size)]
    types = [(CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL for i in range(n)]
    types += [UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = pre_name_for(tj, model, path)
    token_to_id = {t: i for i, t in enumerate(tokens)}

    def special(name: str) -> int | None:
        t = tc.get(name)
        t = t.get("content") if isinstance(t, dict) else t
        return token_to_id.get(t) if t else None

    ids = {"bos": special("bos_token"), "eos": special("eos_token"), "padding": special("pad_token"),
           "unknown": special("unk_token"), "eot": _end_of_turn(token_to_id, special("eos_token"), generation)}
    template = tc.get("chat_template")
    if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return GGUFVocab(pre=pre, tokens=tokens, token_types=types, merges=merges,
                     special_ids={k: v for k, v in ids.items() if v is not None},
                     add_bos=bool(tc.get("add_bos_token", False)), add_eos=bool(tc.get("add_eos_token", False)),
                     chat_template=template)


def _end_of_turn(token_to_id: dict[str, int], eos: int | None, generation: dict | None) -> int | None:
    """kiln's `<|end|>`, else the first stop id of generation_config that is not EOS."""
    if END in token_to_id:
        return token_to_id[END]
    stops = (generation or {}).get("eos_token_id")
    stops = stops if isinstance(stops, list) else [stops]
    return next((i for i in stops if i is not None and i != eos), None)


def split_regexes(pre_tokenizer: dict | None) -> tuple[str, ...] | None:
    """The regexes a tokenizer.json pre-tokenizer applies in turn, if it is a byte-level one built of
    Split / Digits / ByteLevel; None for anything else."""
    if not pre_tokenizer:
        return None
    parts = pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    if not parts or parts[-1]["type"] != "ByteLevel" or parts[-1].get("add_prefix_space"):
        return None
    out: list[str] = []
    for p in parts[:-1]:
        if p["type"] == "Split" and "Regex" in p["pattern"] and p["behavior"] == "Isolated" and not p["invert"]:
            out.append(p["pattern"]["Regex"])
        elif p["type"] == "Digits":
            out.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        else:
            return None
    if parts[-1].get("use_regex", True):
        out.append(GPT2_SPLIT)
    return tuple(out)


def pre_name_for(tj: dict, model: dict, path: Path) -> str:
    """The `tokenizer.ggml.pre` under which llama.cpp splits text as this tokenizer does (see docs/decisions.md:
    "GGUF: which tokenizer.ggml.pre")."""
    splits = split_regexes(tj.get("pre_tokenizer"))
    ignore = bool(model.get("ignore_merges", False))
    names = [name for name, pre in PRE_TOKENIZERS.items() if pre.splits == splits]
    if not names:
        raise ValueError(f"{path}: no llama.cpp pre-tokenizer splits text like this tokenizer "
                         f"(split regexes {splits}); llama.cpp would tokenise differently. Exportable: "
                         + "; ".join(f"{n}: {p.splits}" for n, p in PRE_TOKENIZERS.items()))
    exact = [n for n in names if PRE_TOKENIZERS[n].ignore_merges == ignore]
    specials = {a["content"] for a in tj.get("added_tokens", [])}
    if "llama-bpe" in names and not ignore and _merges_rebuild_every_token(model, specials):
        return "llama-bpe"   # the name every reader knows; ignoring merges changes nothing for this vocabulary
    if not exact:
        raise ValueError(f"{path}: llama.cpp has no pre-tokenizer with these splits and ignore_merges={ignore}")
    return exact[0]


def _merges_rebuild_every_token(model: dict, skip: set[str]) -> bool:
    """True when BPE with the merges turns every vocabulary word into that one token: then llama.cpp's
    ignore_merges (a word in the vocabulary is emitted whole) tokenises exactly as the merges do."""
    bpe = models.BPE(vocab=model["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                   for m in model.get("merges", [])])
    return all(len(bpe.tokenize(word)) == 1 for word in model["vocab"] if word not in skip)

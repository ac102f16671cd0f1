"""Conversations for SFT: read from files and built-in sets, checked, cleaned, deduplicated, counted.

Sources (`ChatDataConfig.sources`): `.jsonl` / `.jsonl.gz` / `.jsonl.zst` files (one record per line), `.json`
files (an array, streamed element by element; otherwise JSON Lines), directories (every such file inside,
recursively), globs, and the built-in sets of `sources.py`. Record formats, detected per record (`format:
auto`) or forced:

    messages   {"messages": [{"role": "user", "content": "..."}, ...]}          (OpenAI; content may be text parts)
    sharegpt   {"conversations": [{"from": "human", "value": "..."}, ...]}      (human/gpt/system/chatgpt/bing/bard)
    alpaca     {"instruction": "...", "input": "...", "output": "..."}         (user = instruction + "\\n\\n" + input)

Every record ends as exactly one of: kept, dropped (a reason), or quarantined (malformed: a reason and its file
and line) -- the data stage's invariant, `records_in = kept + sum(dropped) + quarantined`, checked before the
report is returned. A bad record never stops the run; only configuration that cannot be used does (a source
that matches nothing, a built-in set whose package is missing).

Per conversation, in order (the data stage's functions, applied to each message's content):
1. parse the format, map roles to system / user / assistant;
2. repair Unicode (ftfy's mojibake fix), normalise (NFC, line ends, trailing spaces), strip;
3. turn order: a leading assistant turn is dropped (ShareGPT's split conversations start mid-way in a third of
   its records; a template also needs a user turn before the first answer), so are trailing non-assistant
   turns (nothing to learn from); what is left must be [system] user assistant (user assistant)... with no
   empty message, else it is quarantined (`role_order`, `empty_content`, `no_assistant_turn`);
4. language ID on the joined text (`languages`; [] = keep all; the data stage's filter and threshold):
   `language_xx`, `low_score` (short exchanges such as "Hi" / "Hello" are often `low_score`);
5. exact dedup on the hash of the normalised messages (the first seen is kept): `duplicate`;
6. PII scrubbing of the content (the data stage's regex engine; counted under `pii`);
   generated sets (reasoning-gym) skip 4 and 6: no language to identify, no personal data;
7. decontamination: a conversation sharing a 13-word n-gram with an installed benchmark (HumanEval, MMLU)
   is dropped: `contaminated` (building the n-gram table costs ~1.3 s once per process);
8. `system` put first where there is no system message; `max_examples` stops keeping (the rest are counted
   as `max_examples`, read but not checked).
"""

from __future__ import annotations

import functools
import json
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from kiln.config import ConfigError, LanguageConfig, PIIConfig
from kiln.config.post import ChatDataConfig
from kiln.data import benchmarks as registry
from kiln.data import decontam
from kiln.data.dedup import doc_id
from kiln.data.langid import LanguageFilter
from kiln.data.ngrams import WORD, ngram_hashes, word_hashes
from kiln.data.normalize import fix_mojibake, normalize_text
from kiln.data.pii import ScrubPII
# Private helpers of the data stage's reader: (de)compressed chunks and their lines, shared rather than copied.
from kiln.data.readers import TruncatedStream, _chunks, _lines, format_of
from kiln.data.records import Doc, Drop
from kiln.data.sources import resolve_sources
from kiln.post.sources import Item, Malformed, RawRecord, builtin_records, is_builtin, is_json_array, json_array

CHAT_EXTS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}
"""Speaker names of the formats people have -> kiln's roles (lower-cased first); others are quarantined."""
EXAMPLES_PER_REASON = 20
"""Quarantined records listed (file, line, detail) per reason; the counts are always exact."""
DECONTAM_N = 13
LANGID_CHARS = 4000
"""Language ID reads the first this many characters of a conversation: settled long before, and it costs
~2 ms per conversation of chat length (the data stage reads up to 20k per document)."""


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: list[dict[str, str]]
    """[{"role": "system" | "user" | "assistant", "content": str}], ends with an assistant turn."""
    source: str
    """Where it came from: `file:line` or `set:index`."""
    id: str
    """16 hex digits: xxh3_64 of the normalised messages (the dedup key; `kiln.data.dedup.split_of` takes it)."""


class _Bad(Exception):
    """A record that is quarantined: a report category and a message for a person."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def load_conversations(cfg: ChatDataConfig, decontaminate: bool = True,
                       key: str = "sft.data") -> tuple[list[Conversation], dict[str, Any]]:
    """Every conversation of `cfg.sources` that survives the checks (see the module docstring), in source order,
    and the report that accounts for every record read. `key`: where `cfg` sits in the config (for errors).

    The report: records_in, kept, dropped {reason: n}, quarantined (n), quarantine {reason: {count, examples:
    [{file, line, detail}] (20 at most; for a built-in set `file` is its name and `line` the set's index)}},
    changed {what: conversations} (unicode_fixed, normalized, pii:TYPE, leading_assistant_dropped,
    trailing_turn_dropped, system_added), pii {type: replacements}, formats {format: records}, sources {source:
    {records_in, kept, dropped, quarantined}}, skipped_files [{source, file, reason}], decontaminated_against
    [benchmark names], elapsed_s."""
    start = time.perf_counter()
    tally = _Tally()
    # every source resolved (files listed, packages found) before anything is read: a typo stops the run at once
    opened = [(source, _open(source, f"{key}.sources[{i}]", cfg, tally)) for i, source in enumerate(cfg.sources)]
    for source in cfg.sources:
        tally.sources.setdefault(source, Counter())   # listed even when it holds no record
    clean = _Cleaner(cfg, decontaminate)
    kept: list[Conversation] = []
    for source, items in opened:
        for item in items:
            tally.record_in(source)
            if isinstance(item, Malformed):
                tally.quarantine(source, item.reason, item.file, item.line, item.detail)
            elif cfg.max_examples and len(kept) >= cfg.max_examples:
                tally.drop(source, "max_examples")
            else:
                try:
                    out = clean(item, tally)
                except _Bad as bad:
                    tally.quarantine(source, bad.reason, item.file, item.line, bad.detail)
                    continue
                if isinstance(out, Drop):
                    tally.drop(source, out.reason)
                else:
                    kept.append(out)
                    tally.keep(source)
    return kept, tally.report(time.perf_counter() - start, clean.decontaminated_against)


# ---------------------------------------------------------------- reading


def _open(source: str, key: str, cfg: ChatDataConfig, tally: _Tally) -> Iterator[Item]:
    """The records of one source, read lazily; ConfigError now for a source that cannot be read."""
    if is_builtin(source):
        return builtin_records(source, cfg.seed, cfg.task_config)
    try:
        resolved = resolve_sources([source])
    except ConfigError as e:   # it names data.sources[0]: the one source it was given
        raise ConfigError(str(e).replace("data.sources[0]", key, 1) + "; built-in chat sets: sharegpt, "
                          "chitchat, chatterbot, reasoning-gym:TASK") from None
    chat = [t for t in resolved.tasks if t.path.lower().endswith(CHAT_EXTS)]
    for t in resolved.tasks:
        if t not in chat:
            tally.skip(source, t.rel, "not a chat file (.jsonl, .jsonl.gz, .jsonl.zst, .json)")
    for s in resolved.skipped:
        tally.skip(source, s.rel, s.reason)
    if not chat:
        raise ConfigError(f"{key}: `{source}` holds no chat files ({', '.join(CHAT_EXTS)}); found: "
                          f"{', '.join(t.rel for t in resolved.tasks[:10]) or 'nothing readable'}")
    return (item for task in chat for item in _read(task.path))


def _read(path: str) -> Iterator[Item]:
    try:
        array = format_of(path) == "json" and is_json_array(path)
    except OSError as e:   # a dangling link in a directory, a file that vanished: one bad "record", the run goes on
        yield Malformed(path, None, "unreadable", f"unreadable: {e.strerror or e}")
        return
    yield from json_array(path) if array else _jsonl(path)


def _jsonl(path: str) -> Iterator[Item]:
    """One record per non-blank line (blank lines hold no record and are not counted)."""
    lineno = 0
    try:
        for lineno, raw in enumerate(_lines(_chunks(path)), start=1):
            if not raw.strip():
                continue
            try:
                yield RawRecord(json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8")), path, lineno)
            except UnicodeDecodeError as e:
                yield Malformed(path, lineno, "invalid_utf8", f"byte {e.start} of the line is not UTF-8")
            except (ValueError, RecursionError) as e:
                yield Malformed(path, lineno, "invalid_json", f"invalid JSON: {e}")
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, TruncatedStream) as e:
        yield Malformed(path, lineno + 1, "unreadable", f"unreadable from line {lineno + 1} on: {e}")


# ---------------------------------------------------------------- formats


def detect_format(obj: Any) -> str | None:
    """`messages`, `sharegpt`, `alpaca`, or None when the record matches none."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        return "messages"
    if isinstance(obj.get("conversations"), list):
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def to_messages(obj: Any, fmt: str) -> list[dict[str, str]]:
    """The record as [{"role", "content"}] with kiln's roles; _Bad when it is not a record of `fmt`."""
    if detect_format(obj) != fmt:
        raise _Bad("unknown_format", f"{_describe(obj)}: not a {fmt} record ({_FORMAT_HINT})")
    if fmt == "alpaca":
        return _alpaca(obj)
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    out = []
    for k, m in enumerate(obj[fmt if fmt == "messages" else "conversations"]):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str):
            raise _Bad("unknown_format", f"message {k} is not an object with a string {role_key!r}")
        role = ROLES.get(m[role_key].strip().lower())
        if role is None:
            raise _Bad("unknown_role", f"message {k} has role {m[role_key]!r}; known: {', '.join(ROLES)}")
        out.append({"role": role, "content": _text(m.get(text_key), f"message {k} {text_key!r}")})
    return out


_FORMAT_HINT = 'expected {"messages": [...]}, {"conversations": [...]} or {"instruction", "output"}'


def _alpaca(obj: dict) -> list[dict[str, str]]:
    instruction = _text(obj["instruction"], "'instruction'")
    extra = _text(obj.get("input") or "", "'input'")
    out = [{"role": "system", "content": _text(obj["system"], "'system'")}] if obj.get("system") else []
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    return out + [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj["output"], "'output'")}]


def _text(value: Any, what: str) -> str:
    """A message's content: a string, or OpenAI's list of parts (the text parts joined)."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type") != "text" for p in value):
            raise _Bad("unknown_format", f"{what} has non-text parts ({', '.join(str(p.get('type')) for p in value)})")
        value = "".join(str(p.get("text", "")) for p in value)
    if not isinstance(value, str):
        raise _Bad("empty_content" if value is None else "unknown_format",
                   f"{what} is {'missing' if value is None else type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:   # a JSON "\ud800" escape: a lone surrogate no tokenizer or file can hold
        raise _Bad("invalid_utf8", f"{what} holds a lone surrogate (\\ud800-\\udfff)") from None
    return value


def check_order(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
    """Messages in a trainable order, and what was changed (see the module docstring); _Bad otherwise."""
    changes = []
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    first = len(head)   # index in `messages` of body[0]
    if body and body[0]["role"] == "assistant":
        while body and body[0]["role"] == "assistant":
            body, first = body[1:], first + 1
        changes.append("leading_assistant_dropped")
    if body and body[-1]["role"] != "assistant":
        while body and body[-1]["role"] != "assistant":
            body = body[:-1]
        changes.append("trailing_turn_dropped")
    if not body:
        raise _Bad("no_assistant_turn", f"no assistant turn after a user turn (roles: "
                                        f"{', '.join(m['role'] for m in messages) or 'none'})")
    for k, m in enumerate(body):
        if m["role"] != ("user", "assistant")[k % 2]:
            raise _Bad("role_order", f"message {first + k} is {m['role']} where {('user', 'assistant')[k % 2]} "
                                     "should be: an optional system message first, then user and assistant turns "
                                     "alternating")
    for m in head + body:
        if not m["content"]:
            raise _Bad("empty_content", f"an empty {m['role']} message")
    return head + body, changes


# ---------------------------------------------------------------- cleaning


class _Cleaner:
    """One record -> a Conversation, a Drop (counted by reason), or _Bad (quarantined)."""

    def __init__(self, cfg: ChatDataConfig, decontaminate: bool):
        self.cfg = cfg
        self.language = LanguageFilter(LanguageConfig(languages=list(cfg.languages))) if cfg.languages else None
        self.pii = ScrubPII(PIIConfig())
        self.seen: set[str] = set()
        self.table, self.decontaminated_against = _benchmark_ngrams(DECONTAM_N) if decontaminate else (None, [])

    def __call__(self, item: RawRecord, tally: _Tally) -> Conversation | Drop:
        fmt = item.fmt or (self.cfg.format if self.cfg.format != "auto" else detect_format(item.obj))
        if fmt is None:
            raise _Bad("unknown_format", f"{_describe(item.obj)} matches no chat format ({_FORMAT_HINT})")
        tally.formats[fmt] += 1
        messages = to_messages(item.obj, fmt)
        flags: list[str] = []
        for m in messages:
            fixed = fix_mojibake(m["content"])
            text = normalize_text(fixed).strip()
            flags += ["unicode_fixed"] * (fixed != m["content"]) + ["normalized"] * (text != fixed)
            m["content"] = text
        messages, changes = check_order(messages)
        joined = "\n".join(m["content"] for m in messages)
        if self.language is not None and not item.generated:
            out = self.language(Doc(joined[:LANGID_CHARS], item.file, {}))
            if isinstance(out, Drop):
                return out
        key = doc_id(json.dumps(messages, ensure_ascii=False))
        if key in self.seen:
            return Drop("dedup", "duplicate")
        self.seen.add(key)
        for m in messages if not item.generated else ():
            m["content"], found = self.pii.scrub(m["content"])
            flags += found
        if self.table is not None and _contaminated(self.table, joined):
            return Drop("decontaminate", "contaminated")
        if self.cfg.system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system})
            changes.append("system_added")
        tally.changed.update(set(flags) | set(changes))   # conversations, not messages
        tally.pii.update(f.split(":", 1)[1] for f in flags if f.startswith("pii:"))
        return Conversation(messages, item.where, key)


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"an object (fields: {', '.join(map(str, list(obj)[:8])) or 'none'})"
    return f"a JSON {type(obj).__name__}"


@functools.cache
def _benchmark_ngrams(n: int) -> tuple[np.ndarray, list[str]]:
    """Sorted n-gram hashes of every installed benchmark (the data stage's decontamination table), their names."""
    found = registry.installed()
    parts = [np.zeros(0, dtype=np.uint64)]
    parts += [decontam.benchmark_ngrams(text, n) for b in found for text in b.texts()]
    return decontam.sorted_unique(np.concatenate(parts)), [b.name for b in found]


def _contaminated(table: np.ndarray, text: str) -> bool:
    """`text` shares an n-gram with the table (as the data stage's Decontaminate step tests a document)."""
    words = WORD.findall(text)
    if len(words) < DECONTAM_N or not len(table):
        return False
    grams = ngram_hashes(word_hashes(words), DECONTAM_N)
    pos = np.minimum(np.searchsorted(table, grams), len(table) - 1)
    return bool((table[pos] == grams).any())


# ---------------------------------------------------------------- counting


class _Tally:
    """Counts every record once, where its fate is decided; `report()` checks the invariant."""

    def __init__(self) -> None:
        self.records_in = self.kept = self.quarantined = 0
        self.dropped: Counter[str] = Counter()
        self.quarantine_by: dict[str, dict[str, Any]] = {}
        self.changed: Counter[str] = Counter()
        self.pii: Counter[str] = Counter()
        self.formats: Counter[str] = Counter()
        self.sources: dict[str, Counter[str]] = {}
        self.skipped: list[dict[str, str]] = []

    def record_in(self, source: str) -> None:
        self.records_in += 1
        self.sources[source]["records_in"] += 1

    def keep(self, source: str) -> None:
        self.kept += 1
        self.sources[source]["kept"] += 1

    def drop(self, source: str, reason: str) -> None:
        self.dropped[reason] += 1
        self.sources[source]["dropped"] += 1

    def quarantine(self, source: str, reason: str, file: str, line: int | str | None, detail: str) -> None:
        self.quarantined += 1
        self.sources[source]["quarantined"] += 1
        entry = self.quarantine_by.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append({"file": file, "line": line, "detail": detail})

    def skip(self, source: str, rel: str, reason: str) -> None:
        self.skipped.append({"source": source, "file": rel, "reason": reason})

    def report(self, elapsed_s: float, decontaminated_against: list[str]) -> dict[str, Any]:
        total = self.kept + sum(self.dropped.values()) + self.quarantined
        assert self.records_in == total, f"accounting broken: in {self.records_in} != {total}"
        return {
            "records_in": self.records_in,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "quarantined": self.quarantined,
            "accounting": "records_in = kept + sum(dropped) + quarantined",
            "quarantine": dict(sorted(self.quarantine_by.items(), key=lambda kv: -kv[1]["count"])),
            "changed": dict(sorted(self.changed.items())),
            "pii": dict(sorted(self.pii.items())),
            "formats": dict(sorted(self.formats.items())),
            "sources": {name: {k: c[k] for k in ("records_in", "kept", "dropped", "quarantined")}
                        for name, c in self.sources.items()},
            "skipped_files": self.skipped,
            "decontaminated_against": decontaminated_against,
            "elapsed_s": round(elapsed_s, 3),
        }

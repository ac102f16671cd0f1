"""A user's multiple-choice file: JSON lines in a documented schema, scored like MMLU.

One JSON object per line (docs/eval_formats.md is the user's copy of this):

    {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1, "subject": "arithmetic"}

- question: a non-empty string;
- choices: a list of 2 to 26 choices (strings, or numbers written as JSON numbers, which become their text);
- answer: the 0-based index of the right choice (an integer), its letter ("B" or "b"), or its exact text
  ("4"); a string that is both a letter and another choice's text is refused as ambiguous;
- subject (optional): a string; it names the header ("... about {subject}") and groups the shots;
- id (optional): anything, carried into the per-item records; other keys are ignored.

Blank lines are skipped. A bad line (invalid UTF-8, invalid JSON, not an object, a missing key, a wrong
type, an answer out of range...) is quarantined with its file:line, key and reason, and reading goes on:
the result counts lines = kept + quarantined and lists the first `QUARANTINE_MAX` with the count per
reason, as the data stage's report does. A file with no usable line is an error.

Scored by choice.py (`letter` or `cloze`, log-likelihood) or choice_chat.py (`letter_generative`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

from kiln.eval.choice import FORMATS, LETTERS, ChoiceResult, evaluate_choices
from kiln.eval.choice_chat import FORMAT as GENERATIVE, evaluate_choices_generative

QUARANTINE_MAX = 20


@dataclasses.dataclass(frozen=True)
class BadLine:
    file: str
    line: int
    key: str | None
    """The key at fault, None when the line as a whole is (invalid JSON, not an object)."""
    reason: str
    """One of: invalid_utf8, invalid_json, not_an_object, missing_key, bad_type, empty, too_few_choices,
    too_many_choices, answer_out_of_range, answer_not_a_choice, answer_ambiguous."""
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key + ': ' if self.key else ''}{self.detail}"


@dataclasses.dataclass
class McFile:
    path: Path
    items: list[dict]
    """question, choices (list of str), answer (int), subject (str, may be empty), line, [id]."""
    lines: int
    """Non-blank lines read."""
    quarantined: list[BadLine]

    def report(self) -> dict:
        reasons = collections.Counter(b.reason for b in self.quarantined)
        return {"file": str(self.path), "lines": self.lines, "kept": len(self.items),
                "quarantined": len(self.quarantined), "quarantined_by_reason": dict(sorted(reasons.items())),
                "quarantine": [dataclasses.asdict(b) for b in self.quarantined[:QUARANTINE_MAX]]}


class _Bad(Exception):
    def __init__(self, key: str | None, reason: str, detail: str):
        super().__init__(detail)
        self.key, self.reason, self.detail = key, reason, detail


def parse_item(obj: Any) -> dict:
    """One record checked and normalised (answer as an index); raises _Bad naming the key at fault."""
    if not isinstance(obj, dict):
        raise _Bad(None, "not_an_object", f"a JSON object is needed, not {type(obj).__name__}")
    for key in ("question", "choices", "answer"):
        if key not in obj:
            raise _Bad(key, "missing_key", "missing (each line needs question, choices and answer)")
    q = obj["question"]
    if not isinstance(q, str):
        raise _Bad("question", "bad_type", f"must be a string, not {type(q).__name__}")
    if not q.strip():
        raise _Bad("question", "empty", "is empty")
    choices = obj["choices"]
    if not isinstance(choices, list):
        raise _Bad("choices", "bad_type", f"must be a list, not {type(choices).__name__}")
    if len(choices) < 2:
        raise _Bad("choices", "too_few_choices", f"has {len(choices)}; at least 2 are needed")
    if len(choices) > len(LETTERS):
        raise _Bad("choices", "too_many_choices", f"has {len(choices)}; at most {len(LETTERS)} (A-Z)")
    texts = []
    for i, c in enumerate(choices):
        if isinstance(c, bool) or not isinstance(c, (str, int, float)):
            raise _Bad(f"choices[{i}]", "bad_type", f"must be a string or a number, not {json.dumps(c)[:40]}")
        if isinstance(c, str) and not c.strip():
            raise _Bad(f"choices[{i}]", "empty", "is empty")
        texts.append(c if isinstance(c, str) else json.dumps(c))
    subject = obj.get("subject", "")
    if subject is None:
        subject = ""
    if not isinstance(subject, str):
        raise _Bad("subject", "bad_type", f"must be a string, not {type(subject).__name__}")
    item = {"question": q, "choices": texts, "answer": answer_index(obj["answer"], texts), "subject": subject}
    if "id" in obj:
        item["id"] = obj["id"]
    return item


def answer_index(answer: Any, choices: list[str]) -> int:
    """The 0-based index an answer names: an integer index, a letter, or a choice's exact text."""
    n = len(choices)
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise _Bad("answer", "bad_type",
                   f"must be an index, a letter or a choice's text, not {json.dumps(answer)[:40]}")
    if isinstance(answer, int):
        if not 0 <= answer < n:
            raise _Bad("answer", "answer_out_of_range", f"index {answer} is outside 0..{n - 1}")
        return answer
    text = [i for i, c in enumerate(choices) if c == answer]
    letter = LETTERS.index(answer.upper()) if len(answer) == 1 and answer.upper() in LETTERS else None
    if letter is not None and letter >= n and not text:
        raise _Bad("answer", "answer_out_of_range", f"letter {answer!r} is beyond the {n} choices (A-{LETTERS[n - 1]})")
    if letter is not None and letter < n and text and text != [letter]:
        raise _Bad("answer", "answer_ambiguous", f"{answer!r} is the letter of choice {letter} and the text of "
                                                 f"choice {text[0]}; give the index instead")
    if text:
        return text[0]
    if letter is not None:
        return letter
    raise _Bad("answer", "answer_not_a_choice", f"{answer!r} is neither a letter (A-{LETTERS[n - 1]}) nor the text of "
                                                "a choice" + ("; an index is a JSON number, not a string"
                                                               if answer.strip().isdigit() else ""))


def read_mc_file(path: str | Path) -> McFile:
    """Every line of a multiple-choice JSONL file: the good ones as items, the bad ones quarantined."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"multiple-choice file {path} does not exist")
    items, bad, lines = [], [], 0
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte-order mark some editors write
        raw = raw[3:]
    for no, blob in enumerate(raw.split(b"\n"), start=1):
        if not blob.strip():
            continue
        lines += 1
        try:
            try:
                text = blob.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Bad(None, "invalid_utf8", f"not UTF-8 (byte {e.start} of the line)") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _Bad(None, "invalid_json", f"invalid JSON at column {e.colno}: {e.msg}") from None
            item = parse_item(obj)
        except _Bad as b:
            bad.append(BadLine(str(path), no, b.key, b.reason, b.detail))
            continue
        item["line"] = no
        items.append(item)
    if not items:
        first = f"; first: {bad[0]}" if bad else ""
        raise ValueError(f"multiple-choice file {path}: no usable line ({lines} read, {len(bad)} bad{first})")
    return McFile(path, items, lines, bad)


@dataclasses.dataclass
class McFileResult(ChoiceResult):
    file: str = ""
    lines: int = 0
    quarantined: int = 0
    quarantined_by_reason: dict = dataclasses.field(default_factory=dict)
    quarantine: list = dataclasses.field(default_factory=list)
    """The first QUARANTINE_MAX bad lines: file, line, key, reason, detail."""
    unparsed: int | None = None
    """letter_generative only: replies with no letter in them."""
    max_new_tokens: int | None = None
    """letter_generative only: the reply budget."""

    def summary(self) -> dict:
        """ChoiceResult's summary with the file's counts (the quarantined lines themselves stay on the result)."""
        return {k: v for k, v in super().summary().items() if k != "quarantine"}


def evaluate_mc_file(scorer, path: str | Path, fmt: str = "letter", k: int = 0,
                     max_new_tokens: int = 32) -> McFileResult:
    """Read a multiple-choice JSONL file and score its good items: `letter` / `cloze` by log-likelihood
    (choice.evaluate_choices), `letter_generative` by the letter in a greedy reply (a chat model's way)."""
    if fmt not in (*FORMATS, GENERATIVE):
        raise ValueError(f"multiple-choice format {fmt!r}: use one of {', '.join((*FORMATS, GENERATIVE))}")
    mc = read_mc_file(path)
    report = mc.report()
    del report["kept"]
    if fmt == GENERATIVE:
        res = evaluate_choices_generative(scorer, mc.items, k, max_new_tokens)
        base = {f.name: getattr(res, f.name) for f in dataclasses.fields(ChoiceResult)}
        return McFileResult(**base, **report, unparsed=res.unparsed, max_new_tokens=max_new_tokens)
    res = evaluate_choices(scorer, mc.items, fmt, k)
    return McFileResult(**dataclasses.asdict(res), **report)

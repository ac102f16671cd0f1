"""Final answers out of generated text: numbers (maths), letters (multiple choice), tagged answers.

One set of rules for every generative benchmark, so a base model's few-shot continuation and a chat
model's reply are judged alike. docs/eval_formats.md states the rules for users; the order below is
the contract (the first rule that finds something wins).

Numbers (`extract_number`):
  1. the last closed `<answer>...</answer>` (kiln's think/answer format): the first number in it;
  2. after the last `####` (GSM8K's marker): the first number after it;
  3. after the last "the answer is" / "final answer is" / "final answer:" (any case; lm-eval's
     gsm8k-cot "The answer is N."): the first number after it;
  4. the last `\\boxed{...}`: the first number in it;
  5. the last number anywhere.
  A number is an optional minus, an optional `$`, digits with optional thousands commas (`1,234`)
  and an optional decimal part. It comes back canonical: `$`, commas and a sentence's final `.`
  gone (`"$1,234.50."` -> `"1234.50"`). A minus right after a digit or letter is an operator, not a
  sign (`"10-3"` gives 10 and 3). Fractions, percentages as such and scientific notation are not
  parsed (`3/4` is 3 and 4).

Letters (`extract_choice`), restricted to the item's own letters (A.. for its choices):
  1. inside the last `<answer>...</answer>` if there is one (the rules below on its content only);
  2. the whole reply is a letter, maybe in brackets, bold or with a full stop: `B`, `(B)`, `**B**`;
  3. the last "answer [is|:] X", else the last "choice/option [is|:] X", with X a capital letter or a
     bracketed letter of either case (`The answer is (b)`, `Answer: C`, `the correct option is D`); a
     lone lower-case letter is not taken (it is the article in "the answer is a dog");
  4. a reply that starts with a letter and `.`, `)`, `:` or a line end (`B. Paris`, `C)`);
  5. a reply that is exactly one choice's text (case and a final full stop ignored);
  6. the last bracketed letter anywhere (`... so (C) it is`).
  Otherwise None: the item counts as wrong and as unparsed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

def extract_tagged(text: str, tag: str = "answer") -> str | None:
    """Content of the last closed `<tag>...</tag>`, else the rest of the text after a last `<tag>` left open
    (a reply cut by the token budget), else None. Stripped."""
    closed = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)   # re caches the compiled pattern
    if closed:
        return closed[-1].strip()
    opened = text.rfind(f"<{tag}>")
    return text[opened + len(tag) + 2:].strip() if opened >= 0 else None


# ------------------------------------------------------------------ numbers

# (?<![\w.]) keeps a minus after a digit (an operator) and digits inside words or decimals out of a start.
_NUMBER = re.compile(r"(?<![\w.])(-)?\$?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?")
_MARKERS = [re.compile(r"####"),
            re.compile(r"(?i)\banswer\s+is\b|\bfinal\s+answer\s*:")]
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def numbers_in(text: str) -> list[str]:
    """Every number in `text`, canonical (no `$`, no thousands commas), in order."""
    return [f"{m.group(1) or ''}{m.group(2).replace(',', '')}{m.group(3) or ''}" for m in _NUMBER.finditer(text)]


def extract_number(text: str) -> str | None:
    """The final numeric answer of a reply (see the module docstring for the rules), or None."""
    tagged = extract_tagged(text)
    if tagged is not None:
        found = numbers_in(tagged)
        if found:
            return found[0]
    for marker in _MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            found = numbers_in(text[hits[-1].end():])
            if found:
                return found[0]
    boxed = _BOXED.findall(text)
    if boxed:
        found = numbers_in(boxed[-1])
        if found:
            return found[0]
    found = numbers_in(text)
    return found[-1] if found else None


def parse_number(text: str | None) -> Decimal | None:
    """The value of a number as `numbers_in` writes it (also `$`, commas, a final `.` and spaces), or None."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def same_number(a: str | None, b: str | None, rel_tol: float = 1e-6) -> bool:
    """Equal as numbers: exactly when both are whole (`28080` == `28080.0`), else within `rel_tol`
    (and 1e-9 absolute, for answers near zero). Unparseable on either side is unequal."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    if x == y:
        return True
    if x == x.to_integral_value() and y == y.to_integral_value():
        return False
    return math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=1e-9)


# ------------------------------------------------------------------ letters

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DECOR = "*_`\"' \t\n"
_ALONE = re.compile(r"\A[(\[]?([A-Za-z])[)\]]?\.?\Z")
_MARKED = [re.compile(
    rf"(?i:\b{word}\b)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:=]?\s*"
    r"(?i:\b(?:option|choice)\b)?\s*[*_`\"']*\s*(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?![\w']))")
    for word in ("answer", "(?:choice|option)")]   # "the answer is B, not option C" means B
_LEADING = re.compile(r"\A[(\[]?([A-Z])(?:[).:\]]|\s*\n|\Z)")
_BRACKETED = re.compile(r"\(([A-Z])\)")


def extract_choice(text: str, n_choices: int, choices: Sequence[str] | None = None) -> int | None:
    """The index of the choice a reply names (see the module docstring for the rules), or None."""
    tagged = extract_tagged(text)
    if tagged is not None:
        text = tagged
    valid = LETTERS[:n_choices]

    def index(letter: str | None) -> int | None:
        return valid.index(letter.upper()) if letter and letter.upper() in valid else None

    bare = text.strip(_DECOR)
    m = _ALONE.match(bare)
    if m and index(m.group(1)) is not None:
        return index(m.group(1))
    for marked in _MARKED:
        for m in reversed(list(marked.finditer(text))):
            i = index(m.group(1) or m.group(2))
            if i is not None:
                return i
    m = _LEADING.match(bare)
    if m and index(m.group(1)) is not None:
        return index(m.group(1))
    if choices is not None:
        said = bare.rstrip(".").strip(_DECOR).casefold()
        hits = [i for i, c in enumerate(choices) if str(c).strip().rstrip(".").casefold() == said]
        if len(hits) == 1:
            return hits[0]
    for m in reversed(list(_BRACKETED.finditer(text))):
        if index(m.group(1)) is not None:
            return index(m.group(1))
    return None

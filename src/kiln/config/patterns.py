"""Pre-tokenisation split patterns: named presets or a user regex (Oniguruma syntax, as `tokenizers` uses)."""

from __future__ import annotations

# GPT-4 (cl100k) split, as Llama 3 uses it: contractions, letter runs with one leading non-letter,
# digits in groups of 1-3, punctuation runs, newlines, whitespace.
GPT4 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PATTERNS = {
    "gpt4": GPT4,
    "gpt4-digits": GPT4.replace(r"\p{N}{1,3}", r"\p{N}"),             # every digit its own token
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}


def resolve_pattern(pattern: str) -> str:
    """The regex for a preset name, or the pattern itself."""
    return PATTERNS.get(pattern, pattern)


def check_pattern(pattern: str) -> None:
    """ValueError naming the presets if `pattern` is neither a preset nor a regex `tokenizers` compiles."""
    from tokenizers import Regex
    if not pattern:
        raise ValueError(f"empty pattern; use one of {', '.join(PATTERNS)} or a regex")
    if pattern in PATTERNS:
        return
    try:
        Regex(pattern)
    except Exception as e:   # tokenizers raises its own Exception type for a bad regex
        raise ValueError(f"{pattern!r} is not a preset ({', '.join(PATTERNS)}) and not a valid regex: {e}") from None

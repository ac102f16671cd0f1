"""A conversation as token ids plus the mask of the tokens SFT trains on: every assistant turn, nothing else.

`mask[t]` is True when token t is a target: the loss at position t - 1 (which predicts token t) counts. The
trained tokens of a turn are the assistant's content and the end-of-turn token that closes it (kiln's
`<|end|>`, ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), so the model learns what to say and when to stop.
Not trained: system and user turns, the role markers and the generation prompt (`<|assistant|>\\n`,
`<|im_start|>assistant\\n`: at inference the prompt supplies them), and the whitespace a template puts after
the end-of-turn token (`<|end|>\\n`, `<|im_end|>\\n`): generation stops at the end-of-turn token, so that
newline is never generated; it belongs to the next turn's prefix.

Two ways, both giving ids identical to the model's own chat encoding (`Tokenizer.encode_chat`, which equals
transformers' `apply_chat_template` for imported templates):

- kiln's format: the pieces of `special.chat_segments` (markers as special ids, content as plain text); a
  turn opens at `<|assistant|>` and closes at `<|end|>`.
- any other (Jinja) template, by rendering prefixes: for assistant turn i, P = the conversation before it
  with the generation prompt, Q = the conversation through it. P and Q must be prefixes of the full render F
  (else ValueError: a template that does not render a conversation's prefixes as prefixes of it cannot be
  masked this way); the turn is F[len(P):len(Q)] less trailing whitespace. Characters map to tokens through
  the `tokenizers` offsets of F encoded with special tokens recognised; a token is trained when it overlaps a
  turn (a token that a merge makes straddle the start of a turn, `\\n` + first word, is trained).
  Templates that render history differently from the last turn (Qwen3 adds an empty `<think></think>` to the
  last assistant turn only, so Q is not a prefix of F for earlier turns) take the turn to end at the first
  end-of-turn token (a stop id's text) after P.

`max_len`: a longer conversation is cut after the last assistant turn that fits (whole turns, nothing half
learned); when not even the first assistant turn fits it is cut at `max_len` (the part of that turn that fits
still trains). Either way `truncated` is set; a cut that leaves no trained token gives an all-False mask,
which the caller drops and counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kiln.tokenizer.core import Tokenizer
from kiln.tokenizer.special import ASSISTANT, END, chat_segments


@dataclass(frozen=True, slots=True)
class EncodedChat:
    ids: list[int]
    """The conversation's token ids, as `Tokenizer.encode_chat` gives them (cut to max_len when truncated)."""
    mask: list[bool]
    """Same length as ids; True = a training target (assistant content and its end-of-turn token)."""
    truncated: bool = False
    """The conversation was longer than max_len and was cut."""

    @property
    def n_targets(self) -> int:
        return sum(self.mask)


def encode_conversation(tok: Tokenizer, messages: Sequence[Mapping[str, str]],
                        max_len: int | None = None) -> EncodedChat:
    """Ids and assistant-only training mask of `messages` (list of {"role", "content"}) in `tok`'s chat format.

    ValueError when there is no assistant turn or the template cannot be masked by prefixes; a template that
    refuses a role raises its TemplateError (a ValueError) naming it.
    """
    if not any(m.get("role") == "assistant" for m in messages):
        roles = ", ".join(str(m.get("role")) for m in messages) or "none"
        raise ValueError(f"conversation has no assistant turn (roles: {roles}): nothing to train on")
    if max_len is not None and max_len <= 0:
        raise ValueError(f"max_len={max_len} must be > 0")
    if tok.kiln_format:
        ids, mask, ends = _kiln(tok, messages)
    else:
        ids, mask, ends = _by_prefixes(tok, messages)
    assert len(ids) == len(mask)
    if max_len is None or len(ids) <= max_len:
        return EncodedChat(ids, mask)
    fits = [e for e in ends if e <= max_len]
    cut = fits[-1] if fits else max_len
    return EncodedChat(ids[:cut], mask[:cut], truncated=True)


# ---------------------------------------------------------------- kiln's own format


def _kiln(tok: Tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool], list[int]]:
    """kiln's pieces, encoded one by one exactly as `Tokenizer.encode_chat` does; (ids, mask, turn ends)."""
    special = tok.special_ids
    ids: list[int] = []
    mask: list[bool] = []
    ends: list[int] = []
    in_turn, content = False, iter(m["content"] for m in messages if m["role"] == "assistant")
    for is_special, text in chat_segments(messages):
        if is_special:
            ids.append(special[text])
            mask.append(in_turn and text == END)   # the closing <|end|> is a target, the opening marker is not
            if text == ASSISTANT:
                in_turn = True
            elif text == END and in_turn:
                in_turn = False
                ends.append(len(ids))
            continue
        piece = tok.encode(text)
        ids += piece
        mask += _content_mask(tok, text, next(content), piece) if in_turn else [False] * len(piece)
    return ids, mask, ends


def _content_mask(tok: Tokenizer, text: str, content: str, piece: list[int]) -> list[bool]:
    """Mask of `piece` (the ids of `text` = template glue + `content`): the glue's tokens (the newline after
    `<|assistant|>`) are not trained when they tokenize apart from the content; when a merge joins them to the
    content (rare), the joined token is trained."""
    assert text.endswith(content), "chat_segments puts the content at the end of its text piece"
    glue = text[:len(text) - len(content)]
    head = tok.encode(glue) if glue else []
    # ids equal the glue's own ids => those tokens' bytes are exactly the glue; the rest are exactly the content
    k = len(head) if piece[:len(head)] == head else 0
    return [False] * k + [True] * (len(piece) - k)


# ---------------------------------------------------------------- any other chat template


def _by_prefixes(tok: Tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool], list[int]]:
    """Assistant spans found by rendering prefixes (see the module docstring); (ids, mask, turn ends)."""
    full = tok.render_chat(messages)
    spans = [_turn_span(tok, messages, i, full) for i, m in enumerate(messages) if m["role"] == "assistant"]
    enc = tok._special_backend.encode(full, add_special_tokens=False)   # = encode_with_special(full), with offsets
    ids = enc.ids
    mask = [False] * len(ids)
    ends = []
    k = 0   # spans and tokens are both in order: one pass
    for start, end in spans:
        while k < len(ids) and _token_end(enc.offsets[k]) <= start:
            k += 1
        while k < len(ids) and _token_start(enc.offsets[k]) < end:
            mask[k] = True
            k += 1
        ends.append(k)
    return ids, mask, ends


def _token_start(offset: tuple[int, int]) -> int:
    return offset[0]


def _token_end(offset: tuple[int, int]) -> int:
    # An empty offset (a post-processor that trims whitespace can make one) still stands at its position:
    # it counts as covering the character there, so it falls on the side of a span boundary it lies on.
    return max(offset[1], offset[0] + 1)


def _turn_span(tok: Tokenizer, messages: Sequence[Mapping[str, str]], i: int, full: str) -> tuple[int, int]:
    """Character span of assistant turn i in the full render: its content and end-of-turn token."""
    prompt = tok.render_chat(messages[:i], add_generation_prompt=True)
    if not full.startswith(prompt):
        at = _first_difference(prompt, full)
        raise ValueError(
            f"{tok.path or 'tokenizer'}: the chat template renders messages[:{i}] (with the generation prompt) "
            f"as something that is not a prefix of the whole conversation (they differ at character {at}: "
            f"{prompt[at:at + 40]!r} vs {full[at:at + 40]!r}); assistant turns cannot be found by prefixes. "
            "Fine-tune with kiln's own chat format, or a template that renders each turn independently")
    start = len(prompt)
    through = tok.render_chat(messages[:i + 1])
    if full.startswith(through) and len(through) > start:
        end = len(through)
    else:   # history rendered differently from a last turn (Qwen3): the turn ends at its end-of-turn token
        end = _end_of_turn(tok, full, start, i)
    return start, start + len(full[start:end].rstrip())


def _end_of_turn(tok: Tokenizer, full: str, start: int, i: int) -> int:
    markers = [t for t in (tok.id_to_token(s) for s in tok.stop_ids) if t]
    found = [p + len(t) for t in markers if (p := full.find(t, start)) >= 0]
    if not found:
        raise ValueError(f"{tok.path or 'tokenizer'}: the chat template renders assistant turn {i} differently "
                         "in the whole conversation than as its last turn, and no end-of-turn token "
                         f"({', '.join(markers) or 'none known'}) follows it; its span cannot be found")
    return min(found)


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((j for j in range(n) if a[j] != b[j]), n)

"""Special tokens and the chat format: one place, so training, tokenizing and generation agree.

Ids are fixed by order: `<|bos|>` is 0, `<|eos|>` 1, `<|pad|>` 2, the chat
markers 3..6, then `n_reserved` spare tokens, then the 256 byte tokens and
the merges.

A conversation renders as (the same string the Jinja `CHAT_TEMPLATE` gives):

    <|bos|><|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

`<|end|>` closes every turn, so it is the stop token of a chat model
(`<|eos|>` separates pretraining documents).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"

CORE_SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
ROLES = ("system", "user", "assistant")


def special_tokens(n_reserved: int) -> list[str]:
    """Every special token in id order: the core seven, then `<|reserved_0|>`..`<|reserved_{n-1}|>`."""
    return [*CORE_SPECIAL_TOKENS, *(f"<|reserved_{i}|>" for i in range(n_reserved))]


def role_token(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
    return f"<|{role}|>"


# Hugging Face chat template (Jinja), written into tokenizer_config.json. Keep in step with chat_segments().
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + m['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_segments(messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = False) -> Iterator[tuple[bool, str]]:
    """The pieces of a rendered conversation as (is_special, text), in order.

    Joining the texts gives exactly what CHAT_TEMPLATE renders; keeping the pieces
    apart lets a tokenizer map the markers to special ids while message content is
    always encoded as plain text (a user typing `<|end|>` gets no special token).
    """
    yield True, BOS
    for m in messages:
        yield True, role_token(m["role"])
        yield False, "\n" + m["content"]
        yield True, END
        yield False, "\n"
    if add_generation_prompt:
        yield True, ASSISTANT
        yield False, "\n"


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as one string, identical to CHAT_TEMPLATE's rendering."""
    return "".join(text for _, text in chat_segments(messages, add_generation_prompt))

"""Engine outputs shaped as OpenAI's completion and chat completion objects, whole or as stream chunks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kiln.infer.engine import Output, TokenLogprob
from kiln.serve.protocol import GenRequest
from kiln.tokenizer import Tokenizer


class TokenText:
    """Each id's own text and bytes, cached (the top alternatives repeat a lot)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._text: dict[int, str] = {}

    def text(self, i: int) -> str:
        s = self._text.get(i)
        if s is None:
            s = self._text[i] = self.tok.decode([i])
        return s

    def bytes(self, i: int) -> list[int]:
        return list(self.tok.decode_bytes([i]))


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, o: Output) -> None:
        self.text += o.text
        self.token_ids += o.token_ids
        self.logprobs += o.logprobs
        if o.finish_reason is not None:
            self.finish_reason = o.finish_reason


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------- log-probabilities

def completion_logprobs(tt: TokenText, entries: list[TokenLogprob | None], offset: int) -> dict[str, Any]:
    """The legacy completions form: parallel lists; an entry None is the prompt's first token (no context)."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        if e is None:
            continue
        s = tt.text(e.id)
        tokens.append(s)
        lps.append(e.logprob)
        top: dict[str, float] = {}
        for i, lp in e.top:     # most likely first; ids that print alike (cut bytes) keep the likeliest
            top.setdefault(tt.text(i), lp)
        tops.append(top)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(tt: TokenText, prompt_ids: list[int], prompt_lps: list[TokenLogprob | None]) -> dict[str, Any]:
    """The prompt's own entries: the first token has no log-probability (None), as OpenAI gives it."""
    first = tt.text(prompt_ids[0])
    rest = completion_logprobs(tt, prompt_lps[1:], len(first))
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def merge_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(tt: TokenText, entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{"token": tt.text(e.id), "logprob": e.logprob, "bytes": tt.bytes(e.id),
                         "top_logprobs": [{"token": tt.text(i), "logprob": lp, "bytes": tt.bytes(i)}
                                          for i, lp in e.top]} for e in entries],
            "refusal": None}


# ---------------------------------------------------------------- whole responses

def completion_body(gen: GenRequest, rid: str, model: str, tt: TokenText, choices: list[Choice],
                    prompt_lps: list[list[TokenLogprob | None] | None]) -> dict[str, Any]:
    n = gen.params.n
    out = []
    for c in choices:
        prompt_ids = gen.prompts[c.index // n]
        text, lps = c.text, None
        entries = c.logprobs
        if gen.discard_output:
            text, entries = "", []
        prefix = ""
        if gen.echo:
            prefix = gen.prompt_text(c.index // n, tt.tok)
        if gen.params.logprobs is not None:
            lps = completion_logprobs(tt, entries, len(prefix))
            if gen.echo:
                lps = merge_logprobs(echo_logprobs(tt, prompt_ids, prompt_lps[c.index // n]), lps)
        out.append({"index": c.index, "text": prefix + text, "logprobs": lps,
                    "finish_reason": "length" if gen.discard_output else c.finish_reason})
    completion = 0 if gen.discard_output else sum(len(c.token_ids) for c in choices)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": out,
            "usage": usage(sum(len(p) for p in gen.prompts), completion)}


def chat_body(gen: GenRequest, rid: str, model: str, tt: TokenText, choices: list[Choice]) -> dict[str, Any]:
    out = [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": chat_logprobs(tt, c.logprobs) if gen.params.logprobs is not None else None,
            "finish_reason": c.finish_reason} for c in choices]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": out,
            "usage": usage(len(gen.prompts[0]), sum(len(c.token_ids) for c in choices))}


# ---------------------------------------------------------------- stream chunks

def completion_chunk(rid: str, model: str, index: int, text: str, logprobs: dict | None,
                     finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, Any], logprobs: dict | None,
               finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

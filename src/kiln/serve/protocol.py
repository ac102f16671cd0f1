"""OpenAI's request bodies read into engine requests, and its error shape.

Parameters are checked here by hand rather than by pydantic models: OpenAI's answers are 400s with its own
messages and `param` naming the field (pydantic's would be 422s listing locations), and the rules on which
parameters exist, which are accepted without effect and which are refused are OpenAI's (docs/decisions.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.infer.sampling import SamplingParams
from kiln.tokenizer import Tokenizer


class ApiError(Exception):
    """An error answered as OpenAI answers it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


SAMPLING = {"temperature", "top_p", "n", "max_tokens", "stop", "stream", "stream_options", "seed",
            "frequency_penalty", "presence_penalty", "logit_bias", "user", "model",
            "top_k", "min_p", "repetition_penalty", "ignore_eos"}   # the last four: vLLM's extensions
COMPLETION_KEYS = SAMPLING | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_KEYS = SAMPLING | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format", "tools",
                        "tool_choice", "parallel_tool_calls", "functions", "function_call", "store", "metadata",
                        "service_tier", "modalities", "audio", "prediction", "reasoning_effort"}
MAX_STOPS = 16


@dataclass
class Limits:
    max_len: int          # context: prompt + output
    max_tokens: int       # the largest max_tokens a request may ask for
    max_n: int            # engine slots


@dataclass
class GenRequest:
    """One API request as engine work: each prompt is submitted with `params` (n samples each)."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    discard_output: bool = False     # max_tokens=0 with echo: the prompt's log-probabilities only
    chat: bool = False
    texts: list[str | None] | None = None   # the prompts as sent, where sent as text (echoed as given)
    model: str = ""                  # the model name asked for (the base's or a LoRA adapter's)

    def prompt_text(self, i: int, tok: Tokenizer) -> str:
        text = self.texts[i] if self.texts else None
        return tok.decode(self.prompts[i]) if text is None else text


# ---------------------------------------------------------------- field checks

def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(f"Invalid type for '{key}': expected a decimal, but got {_type_name(v)} instead.", key,
                  "invalid_type")
    if v < lo:
        raise bad(f"Invalid '{key}': decimal below minimum value. Expected a value >= {lo}, but got {v} instead.",
                  key, "decimal_below_min_value")
    if v > hi:
        raise bad(f"Invalid '{key}': decimal above maximum value. Expected a value <= {hi}, but got {v} instead.",
                  key, "decimal_above_max_value")
    return float(v)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"Invalid type for '{key}': expected an integer, but got {_type_name(v)} instead.", key,
                  "invalid_type")
    if v < lo:
        raise bad(f"Invalid '{key}': integer below minimum value. Expected a value >= {lo}, but got {v} instead.",
                  key, "integer_below_min_value")
    if hi is not None and v > hi:
        raise bad(f"Invalid '{key}': integer above maximum value. Expected a value <= {hi}, but got {v} instead.",
                  key, "integer_above_max_value")
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"Invalid type for '{key}': expected a boolean, but got {_type_name(v)} instead.", key,
                  "invalid_type")
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("Invalid type for 'stop': expected a string or an array of strings.", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise bad(f"Invalid 'stop': at most {MAX_STOPS} stop sequences, got {len(stops)}.", "stop")
    return tuple(s for s in stops if s)


def _refuse(body: dict, key: str, allowed=(None,)) -> None:
    """A parameter OpenAI has and this server cannot honour: refused unless left at a value without effect."""
    v = body.get(key)
    if v not in allowed and v != {} and v != []:
        raise bad(f"'{key}' is not supported by this server (kiln serve); leave it out.", key, "unsupported_parameter")


def check_keys(body: Any, known: set[str]) -> None:
    if not isinstance(body, dict):
        raise bad(f"The request body must be a JSON object, not {_type_name(body)}.")
    unknown = sorted(set(body) - known)
    if unknown:   # OpenAI's own answer to a parameter it does not know
        raise bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0],
                  "unrecognized_argument")


def check_model(body: dict, names: list[str]) -> str:
    """The model asked for: one of `names` (the base's first, then any LoRA adapters'); the base when none."""
    model = body.get("model")
    if model is None:
        return names[0]
    if model not in names:
        raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it. This server "
                       f"serves {', '.join(f'`{n}`' for n in names)} (GET /v1/models).", param="model",
                       code="model_not_found")
    return model


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: an object from token ids (as strings) to a bias in [-100, 100]."""
    raw = body.get("logit_bias")
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise bad(f"Invalid type for 'logit_bias': expected an object, but got {_type_name(raw)} instead.",
                  "logit_bias", "invalid_type")
    bias = {}
    for key, value in raw.items():
        try:
            i = int(key)
        except ValueError:
            i = -1
        if not 0 <= i < vocab_size:
            raise bad(f"Invalid key in 'logit_bias': {key!r} is not a token id of this model (0 to "
                      f"{vocab_size - 1}).", "logit_bias", "invalid_value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad(f"Invalid value in 'logit_bias' for token {key}: {value!r}; expected a number from -100 to "
                      "100.", "logit_bias", "invalid_value")
        bias[i] = float(value)
    return bias


def _sampling(body: dict, limits: Limits, tok: Tokenizer) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:          # OpenAI accepts 0: only the most likely token
        temperature, top_p = 0.0, 1.0
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad(f"Invalid type for 'seed': expected an integer, but got {_type_name(seed)} instead.", "seed",
                  "invalid_type")
    ignore_eos = _bool(body, "ignore_eos")
    return SamplingParams(
        temperature=temperature, top_p=top_p, top_k=max(_int(body, "top_k", 0, -1), 0),   # vLLM's -1: off
        min_p=_number(body, "min_p", 0.0, 0, 1),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-6, 100),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        seed=seed, n=_int(body, "n", 1, 1, limits.max_n), stop=_stops(body),
        stop_ids=() if ignore_eos else tok.stop_ids, ignore_stop_ids=ignore_eos,
        logit_bias=_logit_bias(body, tok.vocab_size))


def _max_tokens(body: dict, key: str, prompt_len: int, default: int | None, limits: Limits, lo: int = 1,
                prompt_param: str = "messages") -> int:
    """`max_tokens` checked against the context: an explicit one that does not fit is an error (as OpenAI);
    the default is cut to what fits."""
    room = limits.max_len - prompt_len
    if room < lo:
        raise bad(f"This model's maximum context length is {limits.max_len} tokens. However, your prompt has "
                  f"{prompt_len} tokens, which leaves no room for the completion. Please reduce the length of "
                  "the prompt.", prompt_param,
                  "context_length_exceeded")
    asked = _int(body, key, None, lo, limits.max_tokens)
    if asked is None:
        return min(room, limits.max_tokens, default or room)
    if asked > room:
        raise bad(f"This model's maximum context length is {limits.max_len} tokens. However, you requested "
                  f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). Please "
                  "reduce the prompt or the completion length.", key, "context_length_exceeded")
    return asked


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
    if opts and not stream:
        raise bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    return stream, bool((opts or {}).get("include_usage"))


# ---------------------------------------------------------------- the two endpoints

def completion_request(body: Any, tok: Tokenizer, limits: Limits, names: list[str]) -> GenRequest:
    check_keys(body, COMPLETION_KEYS)
    model = check_model(body, names)
    _refuse(body, "suffix")
    params = _sampling(body, limits, tok)
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != params.n:
        raise bad("'best_of' other than n is not supported by this server (kiln serve).", "best_of",
                  "unsupported_parameter")
    raw = body.get("prompt")
    prompts = _prompts(raw, tok)
    texts = [raw] if isinstance(raw, str) else [p if isinstance(p, str) else None for p in raw]
    echo = _bool(body, "echo")
    k = _int(body, "logprobs", None, 0, 20)
    longest = max(len(p) for p in prompts)
    max_tokens = _max_tokens(body, "max_tokens", longest, 16, limits, lo=0 if echo else 1, prompt_param="prompt")
    params.max_tokens, params.logprobs = max(max_tokens, 1), k
    params.prompt_logprobs = k if echo and k is not None else None
    stream, usage = _stream(body)
    return GenRequest(prompts, params, stream, usage, echo=echo, discard_output=max_tokens == 0,
                      texts=texts if len(texts) == len(prompts) else None, model=model)


def _prompts(prompt: Any, tok: Tokenizer) -> list[list[int]]:
    """A string, an array of strings, an array of token ids, or an array of such arrays."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of "
                  "token ids, and not empty.", "prompt", "invalid_type" if prompt is not None else "missing_required_parameter")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = tok.encode(p, add_bos=tok.add_bos_token)
        elif isinstance(p, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            ids = p
            if any(not 0 <= i < tok.vocab_size for i in ids):
                raise bad(f"'prompt' token ids must be in [0, {tok.vocab_size}).", "prompt")
        else:
            raise bad("'prompt' items must all be strings or all arrays of token ids.", "prompt", "invalid_type")
        if not ids:
            raise bad("'prompt' is empty: give at least one token.", "prompt")
        out.append(list(ids))
    return out


def chat_request(body: Any, tok: Tokenizer, limits: Limits, names: list[str]) -> GenRequest:
    check_keys(body, CHAT_KEYS)
    model = check_model(body, names)
    for key in ("tools", "functions", "audio", "prediction"):
        _refuse(body, key)
    _refuse(body, "tool_choice", (None, "none", "auto"))
    _refuse(body, "function_call", (None, "none", "auto"))
    _refuse(body, "response_format", (None, {"type": "text"}))
    _refuse(body, "modalities", (None, ["text"]))
    params = _sampling(body, limits, tok)
    messages = _messages(body.get("messages"))
    try:
        ids = tok.encode_chat(messages, add_generation_prompt=True)
    except ValueError as e:     # no chat template, or one that fails on these messages
        raise bad(str(e), "messages") from None
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params.max_tokens = _max_tokens(body, key, len(ids), None, limits)
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, 20)
    if top is not None and not want:
        raise bad("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")
    params.logprobs = (top or 0) if want else None
    stream, usage = _stream(body)
    return GenRequest([ids], params, stream, usage, chat=True, model=model)


ROLES = {"system", "developer", "user", "assistant", "tool"}


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("Invalid 'messages': expected a non-empty array of messages.", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"Invalid '{where}': a message is an object with a 'role' among {sorted(ROLES)}.",
                      f"{where}.role", "invalid_value")
        content = m.get("content")
        if isinstance(content, list):     # content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"Invalid '{where}.content': only text parts are supported by this server.",
                              f"{where}.content", "unsupported_parameter")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"Invalid type for '{where}.content': expected a string or an array of text parts.",
                      f"{where}.content", "invalid_type")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out

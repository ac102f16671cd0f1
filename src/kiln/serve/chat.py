"""`kiln chat`: talk to a run's model in the terminal (the engine in this process, no server).

The conversation is kept and rendered with the model's chat template each turn; replies stream as they are
generated and end at the template's stop tokens. `/reset` starts over, `/exit` (or Ctrl-D) quits, Ctrl-C stops
a reply. When the conversation outgrows the context, the oldest turns are dropped (the system message stays).
"""

from __future__ import annotations

import queue
import sys

from kiln.config import Config
from kiln.infer.sampling import SamplingParams

HELP = "/reset clears the conversation, /exit quits, Ctrl-C stops a reply"


def run_chat(cfg: Config) -> None:
    from kiln.serve.loader import load_served

    served = load_served(cfg)
    try:
        _loop(served, cfg)
    finally:
        served.engine.stop()


def _loop(served, cfg: Config) -> None:
    s, tok, engine = cfg.serve, served.tokenizer, served.engine
    if tok.chat_template is None:
        raise ValueError(f"{tok.path} has no chat template: this is a base model; fine-tune it with `kiln sft` "
                         "or use `kiln generate` to continue text")
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    start = [{"role": "system", "content": s.system}] if s.system else []
    history = list(start)
    print(f"kiln chat: {served.name} ({HELP})", flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if text in ("/help", "/?"):
            print(HELP, flush=True)
            continue
        turn = [*history, {"role": "user", "content": line}]
        ids, turn = _fit(tok, turn, len(start), engine.max_len)
        if ids is None:
            print(f"(this message alone does not fit the context of {engine.max_len} tokens)", flush=True)
            continue
        params = SamplingParams(max_tokens=min(s.max_tokens, engine.max_len - len(ids)), temperature=s.temperature,
                                stop_ids=tok.stop_ids)
        reply = _reply(engine, ids, params)
        history = [*turn, {"role": "assistant", "content": reply}]


def _fit(tok, messages: list[dict], keep: int, max_len: int):
    """The conversation's ids with room for a reply, dropping the oldest turns after the first `keep`."""
    while True:
        ids = tok.encode_chat(messages, add_generation_prompt=True)
        if len(ids) < max_len:
            return ids, messages
        if len(messages) <= keep + 1:
            return None, messages
        messages = messages[:keep] + messages[keep + 2:]   # one user turn and its reply


def _reply(engine, ids: list[int], params: SamplingParams) -> str:
    outputs: queue.Queue = queue.Queue()
    req = engine.submit(ids, params, outputs.put)
    text = ""
    try:
        while True:
            o = outputs.get()
            if o.finish_reason == "error":
                print(f"\n(error: {o.text})", end="")
                break
            sys.stdout.write(o.text)
            sys.stdout.flush()
            text += o.text
            if o.finish_reason is not None:
                break
    except KeyboardInterrupt:
        engine.cancel(req)
        print(" [stopped]", end="")
    print(flush=True)
    return text

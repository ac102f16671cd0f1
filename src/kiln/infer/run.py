"""`kiln generate`: load a checkpoint and the run's tokenizer, sample, print."""

from __future__ import annotations

from kiln.config import Config
from kiln.config.rundir import RunDir
from kiln.formats.checkpoint import load_model, resolve_checkpoint
from kiln.runtime.device import pick_device


def run_generate(cfg: Config) -> list[str]:
    from kiln.infer.generate import stream
    from kiln.tokenizer import Tokenizer

    g = cfg.generate
    rd = RunDir(cfg.run_path)
    ckpt = resolve_checkpoint(rd.checkpoints, g.checkpoint)
    model, _ = load_model(ckpt, pick_device(cfg.train.device))
    tok = Tokenizer.from_file(rd.tokenizer_file())
    stop_ids = tok.stop_ids + tuple(tok.special_ids[s] for s in g.stop if s in tok.special_ids)
    text_stops = [s for s in g.stop if s not in tok.special_ids]
    if g.chat:   # the reply alone is printed and returned: the rendered turn markers are the template's, not text
        messages = ([{"role": "system", "content": g.system}] if g.system else []) + \
                   [{"role": "user", "content": g.prompt}]
        prompt_ids, shown_prompt = tok.encode_chat(messages, add_generation_prompt=True), ""
    else:
        prompt_ids, shown_prompt = tok.encode(g.prompt, add_bos=tok.add_bos_token), g.prompt
    outputs = []
    for i in range(g.num_samples):
        if g.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(shown_prompt, end="", flush=True)
        ids: list[int] = []
        shown = text = ""
        for token in stream(model, prompt_ids, max_new_tokens=g.max_new_tokens,
                            temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, stop_ids=stop_ids,
                            seed=g.seed + i):
            ids.append(token)
            text = tok.decode(ids)
            cut = _first_stop(text, text_stops)
            if cut is not None:
                text = text[:cut]
            # Decode the whole tail each time: a multi-byte character may span tokens.
            if not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
            if cut is not None:
                break
        print(text[len(shown):], flush=True)
        outputs.append(shown_prompt + text)
    return outputs


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None

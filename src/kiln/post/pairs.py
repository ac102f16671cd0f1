"""Preference pairs for DPO: read them, encode them as SFT renders a conversation, and build them from a
model's own samples (`kiln dpo build-pairs`).

A pair file is JSONL, one {"prompt", "chosen", "rejected"} per line. Each field is a string (the prompt one
user turn, an answer one assistant turn) or a list of chat messages (the prompt: the turns before the
answer; an answer: the assistant message(s); an answer that repeats the prompt's turns first, as some
exported sets do, has them removed). Other keys (scores, ids) are ignored.

Nothing is lost silently: every line that is not blank is a record, and every record is kept or quarantined
with its file, line and reason (invalid UTF-8, bad JSON, not an object, a missing key, malformed messages,
an empty side, identical chosen and rejected, a template that cannot render it, nothing left after
truncation): records = kept + quarantined, in the report beside the stage's output.

Encoding (`encode_pair`): prompt + answer goes through `encode_conversation`, the function SFT trains with,
so an answer is exactly the assistant turn SFT would train on, its end-of-turn token included; only the
answer's tokens (those after the prompt rendered with the generation prompt) are scored. A pair longer than
the context keeps the start of its answers and cuts the prompt's left side, the same cut on both sides
(`fit_pair`); one whose answers are no longer told apart after the cut is dropped and counted.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.post.sft import Example, example_of
from kiln.runtime.limits import time_limit
from kiln.tokenizer.loader import IGNORE

Messages = list[dict[str, str]]
KEYS = ("prompt", "chosen", "rejected")
MAX_EXAMPLES = 200        # quarantined records listed in a report with their file and line (all are counted)


# ---------------------------------------------------------------- counting every record

@dataclass
class Tally:
    """Every record's fate: kept, or quarantined for a reason with its file and line."""

    records: int = 0
    kept: int = 0
    quarantined: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    truncated: int = 0     # kept pairs whose prompt or answers were cut to fit the context

    def quarantine(self, where: str, reason: str, detail: str = "") -> None:
        self.quarantined[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": where, "reason": reason, "detail": detail[:300]})

    def drop(self, where: str, reason: str, detail: str = "") -> None:
        """A record kept when read, dropped later (at encoding)."""
        self.kept -= 1
        self.quarantine(where, reason, detail)

    def as_dict(self) -> dict[str, Any]:
        assert self.records == self.kept + sum(self.quarantined.values()), "a record went uncounted"
        return {"records": self.records, "kept": self.kept, "truncated": self.truncated,
                "quarantined": dict(sorted(self.quarantined.items())), "quarantine": self.examples}


def expand_paths(specs: Sequence[str], key: str) -> list[Path]:
    """Files and globs, in the given order; a name that matches nothing is a configuration error."""
    out: list[Path] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(spec)))
            if not found:
                raise ValueError(f"{key}: {spec!r} matches no file")
            out += [Path(f) for f in found]
        elif Path(spec).expanduser().is_file():
            out.append(Path(spec).expanduser())
        else:
            raise ValueError(f"{key}: {spec} is not a file (cwd {Path.cwd()}); give JSONL files or globs")
    return out


def jsonl_records(paths: Sequence[Path], tally: Tally) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed object) of every record; lines that are not UTF-8 or not JSON are quarantined."""
    for path in paths:
        with open(path, "rb") as f:   # bytes: one bad line must not stop the file
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                tally.records += 1
                where = f"{path}:{lineno}"
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")   # a BOM (Windows editors) opens line 1
                except UnicodeDecodeError as e:
                    tally.quarantine(where, "invalid_utf8", f"byte {e.start}: {raw[max(0, e.start - 8):e.start + 8]!r}")
                    continue
                try:
                    yield where, json.loads(text)
                except json.JSONDecodeError as e:
                    tally.quarantine(where, "bad_json", f"{e.msg} at column {e.colno}")


# ---------------------------------------------------------------- reading pairs

@dataclass(frozen=True)
class Pair:
    prompt: Messages     # the turns before the answer
    chosen: Messages     # the preferred assistant turn(s)
    rejected: Messages
    where: str           # file:line


class BadRecord(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def as_messages(value: Any, key: str, default_role: str) -> Messages:
    """A string as one turn of `default_role`; a list of {"role", "content"} strings as it is."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise BadRecord("bad_type", f"{key!r} is {type(value).__name__}: give a string or a list of messages")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRecord("bad_messages", f"{key}[{i}] is {str(m)[:80]!r}; a message is "
                                            '{"role": "...", "content": "..."} with string values')
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_pair(record: Any, where: str) -> Pair:
    """A Pair from one parsed record; raises BadRecord (reason, detail) for anything that cannot train."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"a {type(record).__name__}; each line must be a JSON object with "
                                         f"{', '.join(KEYS)}")
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise BadRecord("missing_key", f"no {', '.join(repr(k) for k in missing)} (keys: {sorted(record)[:10]})")
    prompt = as_messages(record["prompt"], "prompt", "user")
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise BadRecord("empty_prompt", "the prompt has no text")
    sides = {}
    for key in ("chosen", "rejected"):
        answer = as_messages(record[key], key, "assistant")
        if answer[:len(prompt)] == prompt and len(answer) > len(prompt):   # the whole conversation, repeated
            answer = answer[len(prompt):]
        if not answer or not any(m["content"].strip() for m in answer):
            raise BadRecord("empty_side", f"{key!r} is empty")
        roles = {m["role"] for m in answer} - {"assistant"}
        if roles:
            raise BadRecord("answer_not_assistant", f"{key!r} holds {', '.join(sorted(roles))} turns; an answer "
                                                    "is assistant message(s), the turns before it go in 'prompt'")
        sides[key] = answer
    if _stripped(sides["chosen"]) == _stripped(sides["rejected"]):
        raise BadRecord("identical", "chosen and rejected are the same answer: nothing to prefer")
    return Pair(prompt, sides["chosen"], sides["rejected"], where)


def _stripped(messages: Messages) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in messages]


def read_pairs(specs: Sequence[str], tally: Tally | None = None, key: str = "dpo.pairs") -> tuple[list[Pair], Tally]:
    """Every pair of the JSONL files (or globs) `specs`; the tally counts each record kept or quarantined."""
    tally = tally or Tally()
    pairs = []
    for where, record in jsonl_records(expand_paths(specs, key), tally):
        try:
            pairs.append(parse_pair(record, where))
            tally.kept += 1
        except BadRecord as e:
            tally.quarantine(where, e.reason, e.detail)
    return pairs, tally


# ---------------------------------------------------------------- encoding

@dataclass(frozen=True)
class EncodedPair:
    chosen: Example      # (inputs, targets), targets IGNORE outside the answer
    rejected: Example
    where: str
    key: int             # a hash of the pair's text: the train / validation split


def answer_tokens(tok, prompt: Messages, answer: Messages) -> tuple[list[int], int, np.ndarray]:
    """(ids, answer start, answer mask) of prompt + answer as SFT renders them.

    The answer starts after the prompt rendered with the generation prompt when that is a prefix of the whole
    (every template kiln knows); otherwise at the answer's first assistant turn counted back from the end of
    the assistant mask (a template that renders earlier turns differently once a reply follows). The answer's
    mask is `encode_conversation`'s from there on: its assistant tokens, each end-of-turn token included,
    never an assistant turn of the prompt."""
    from kiln.tokenizer.assistant_mask import encode_conversation
    enc = encode_conversation(tok, prompt + answer)
    ids = [int(i) for i in enc.ids]
    mask = np.asarray(enc.mask, dtype=bool)
    head = list(tok.encode_chat(prompt, add_generation_prompt=True))
    if ids[:len(head)] == head and mask[len(head):].any():
        start = len(head)
    else:
        runs = np.flatnonzero(mask & ~np.concatenate(([False], mask[:-1])))   # first token of each assistant run
        if len(runs) < len(answer):
            raise ValueError(f"the assistant mask has {len(runs)} turns, the answer {len(answer)}")
        start = int(runs[-len(answer)])
    mask[:start] = False
    return ids, start, mask


Side = tuple[list[int], int, np.ndarray]   # (ids, answer start, answer mask)


def fit_pair(chosen: Side, rejected: Side, limit: int) -> tuple[list[tuple[list[int], np.ndarray]], bool]:
    """Cut a pair to at most `limit` tokens a side; returns [(ids, mask)] * 2 and whether anything was cut.

    The answers keep their start; the prompt loses its left side (the oldest turns), down to half the context
    when the answers need that much, the same count on both sides, so both answers are scored after the same
    context (a left-cut prompt also loses its BOS: rare, and better than losing the answer)."""
    P = max(chosen[1], rejected[1])
    A = max(len(chosen[0]) - chosen[1], len(rejected[0]) - rejected[1])
    if P + A <= limit:
        return [(ids, mask) for ids, _, mask in (chosen, rejected)], False
    keep_prompt = min(P, max(limit - A, limit // 2))
    out = []
    for ids, start, mask in (chosen, rejected):
        cut = max(0, start - keep_prompt)
        out.append((ids[cut:cut + limit], mask[cut:cut + limit]))
    return out, True


def encode_pair(tok, pair: Pair, limit: int) -> tuple[EncodedPair, bool]:
    """Both sides of `pair`, at most `limit` tokens each (`fit_pair`); returns (pair, truncated). Raises
    ValueError for a template that refuses the turns, BadRecord when the cut leaves nothing to tell apart."""
    import xxhash
    sides = [answer_tokens(tok, pair.prompt, answer) for answer in (pair.chosen, pair.rejected)]
    ((c_ids, c_mask), (r_ids, r_mask)), truncated = fit_pair(sides[0], sides[1], limit)
    c, r = example_of(c_ids, c_mask), example_of(r_ids, r_mask)
    if truncated and _answer_of(c) == _answer_of(r):
        raise BadRecord("identical_after_truncation", f"the answers differ only past the {limit}-token context")
    key = xxhash.xxh64_intdigest(json.dumps([pair.prompt, pair.chosen, pair.rejected], sort_keys=True).encode())
    return EncodedPair(c, r, pair.where, key), truncated


def _answer_of(ex: Example) -> list[int]:
    return ex[1][ex[1] != IGNORE].tolist()


def encode_pairs(tok, pairs: Sequence[Pair], limit: int, tally: Tally) -> list[EncodedPair]:
    """Every pair encoded (`encode_pair`); those that cannot be are dropped from the tally's kept count with
    their file, line and reason."""
    out = []
    for pair in pairs:
        try:
            enc, truncated = encode_pair(tok, pair, limit)
        except BadRecord as e:
            tally.drop(pair.where, e.reason, e.detail)
            continue
        except ValueError as e:   # the template refuses a role or an order of turns
            tally.drop(pair.where, "unrenderable", f"{type(e).__name__}: {e}")
            continue
        tally.truncated += truncated
        out.append(enc)
    return out


def split_pairs(pairs: Sequence[EncodedPair], val_fraction: float) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, validation) by a hash of each pair's text: stable when pairs are added or reordered."""
    train, val = [], []
    for p in pairs:
        (val if (p.key % 10_000) < val_fraction * 10_000 else train).append(p)
    return train, val


def load_pairs(tok, specs: Sequence[str], limit: int, key: str = "dpo.pairs") -> tuple[list[EncodedPair], Tally]:
    """Read and encode: the pairs to train on and the tally of every record."""
    pairs, tally = read_pairs(specs, key=key)
    return encode_pairs(tok, pairs, limit, tally), tally


# ---------------------------------------------------------------- building pairs from samples

@dataclass
class PromptItem:
    """One prompt to sample answers for, and what ranks them."""

    prompt: str | Messages            # as given: what the scorer gets and the pair file records
    messages: Messages                # the turns the model answers
    where: str                        # file:line, or reasoning-gym:TASK#i
    item: Any                         # what a verifier / scorer gets: reasoning-gym's TaskItem, or the record
    reference: str | None = None      # a reference answer (chosen when nothing can score samples)


def read_prompts(specs: Sequence[str], count: int, seed: int, tally: Tally,
                 task_config: dict | None = None) -> tuple[list[PromptItem], Any]:
    """Prompt items of dpo.prompts: JSONL files of {"prompt": str | messages, "answer"?: str, ...} (a record
    without a usable prompt is quarantined), or `reasoning-gym:TASK` (`count` generated problems, in the
    think-then-answer format of kiln/post/reasoning.py). Also returns the reasoning-gym task, if any (its
    verifier scores the samples)."""
    from kiln.post.reasoning import SYSTEM_PROMPT, make_task
    items: list[PromptItem] = []
    task = None
    files = []
    for spec in specs:
        if spec.startswith("reasoning-gym:"):
            if task is not None:
                raise ValueError(f"dpo.prompts names two reasoning-gym tasks ({task.name}, {spec}); build the "
                                 "pairs of each with its own `kiln dpo build-pairs` and list both files in dpo.pairs")
            task = make_task(spec.split(":", 1)[1], task_config or {}, seed, count)
            for i, it in enumerate(task.items):
                msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": it.question}]
                items.append(PromptItem(msgs, msgs, f"{spec}#{i}", it, it.answer))
        else:
            files.append(spec)
    for where, record in jsonl_records(expand_paths(files, "dpo.prompts"), tally):
        try:
            if not isinstance(record, dict) or "prompt" not in record:
                raise BadRecord("missing_key", 'each line must be an object with "prompt" (and "answer", optional)')
            msgs = as_messages(record["prompt"], "prompt", "user")
            if not any(m["content"].strip() for m in msgs):
                raise BadRecord("empty_prompt", "the prompt has no text")
            ref = record.get("answer")
            if ref is not None and not (isinstance(ref, str) and ref.strip()):
                raise BadRecord("bad_answer", f"'answer' is {str(ref)[:60]!r}: a non-empty string, or leave it out")
        except BadRecord as e:
            tally.quarantine(where, e.reason, e.detail)
            continue
        tally.kept += 1
        items.append(PromptItem(record["prompt"], msgs, where, record, ref))
    if task is not None:
        tally.records += len(task.items)
        tally.kept += len(task.items)
    return items, task


def scorer_of(spec: str | None, task, timeout: float = 0.0) -> tuple[Callable[[PromptItem, str], float] | None, str]:
    """(score(item, answer) or None, a description): the user's function `dpo.scorer`, called as
    (prompt, answer, item) under a time limit of `timeout` seconds (kiln.runtime.limits); else the reasoning-gym
    verifier; None = rank by reference answers."""
    if spec:
        from kiln.post.reasoning import load_function
        fn = load_function(spec, what="dpo.scorer")
        raw = lambda it: it.item.raw if hasattr(it.item, "raw") else it.item   # noqa: E731

        def score(it, answer):
            with time_limit(timeout):
                return fn(it.prompt, answer, raw(it))
        return score, f"dpo.scorer {spec}"
    if task is not None:
        return (lambda it, answer: task.score(answer, it.item)), f"the reasoning-gym verifier of {task.name}"
    return None, "reference answers (chosen) against a model sample (rejected)"


def sample_answers(model, tok, items: Sequence[PromptItem], n: int, temperature: float, max_new_tokens: int,
                   seed: int, say=print) -> list[list[tuple[str, bool]] | None]:
    """`n` answers per item from kiln's batched engine: (text, finished) each, finished = it stopped on an
    end-of-turn token rather than at max_new_tokens; None for a prompt too long for the context."""
    from kiln.infer.engine import Engine
    from kiln.infer.sampling import SamplingParams
    engine = Engine(model, tok, max_slots=max(n, 16), max_queue=len(items) + 1, seed=seed)
    prompts = [tok.encode_chat(it.messages, add_generation_prompt=True) for it in items]
    fits = [i for i, p in enumerate(prompts) if len(p) < engine.max_len]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, n=n, stop_ids=tok.stop_ids)
    say(f"build-pairs: sampling {n} answers for each of {len(fits)} prompts (temperature {temperature:g}, at most "
        f"{max_new_tokens} tokens)")
    outs = engine.generate([prompts[i] for i in fits], params)
    result: list[list[tuple[str, bool]] | None] = [None] * len(items)
    for i, samples in zip(fits, outs):
        room = engine.max_len - len(prompts[i])
        result[i] = [(tok.decode(ids, skip_special=True), len(ids) < min(max_new_tokens, room)) for ids in samples]
    return result


def rank_samples(item: PromptItem, samples: list[tuple[str, bool]], score, report: dict) -> dict | None:
    """One pair record from an item's samples, or None (the reason counted in report["skipped"]).

    With a score: chosen = the best-scored sample, rejected = the worst; skipped when fewer than two samples
    could be scored or every score ties. A scorer that raises or returns no finite number is counted with the
    error and that sample is left out, never trained on. Without one: the reference answer is chosen and the
    first sample that differs from it rejected."""
    skipped: Counter = report["skipped"]
    texts = [t for t, _ in samples if t.strip()]
    report["empty_samples"] += len(samples) - len(texts)
    report["unfinished_samples"] += sum(not done for _, done in samples)
    if score is None:
        ref = (item.reference or "").strip()
        if not ref:
            skipped["no_reference"] += 1
            return None
        other = next((t for t in texts if t.strip() != ref), None)
        if other is None:
            skipped["every_sample_is_the_reference"] += 1
            return None
        return {"prompt": item.prompt, "chosen": item.reference, "rejected": other, "source": item.where}
    scored = []
    for k, text in enumerate(texts):
        try:
            s = float(score(item, text))
            if not math.isfinite(s):
                raise ValueError(f"returned {s}")
        except Exception as e:   # noqa: BLE001 - the user's code: count it, skip the sample, go on
            report["scorer_errors"] += 1
            if len(report["scorer_error_examples"]) < MAX_EXAMPLES:
                report["scorer_error_examples"].append({"where": item.where, "sample": k,
                                                        "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        scored.append((s, text))
    if len(scored) < 2:
        skipped["fewer_than_two_scored"] += 1
        return None
    best = max(scored, key=lambda st: st[0])
    worst = min(scored, key=lambda st: st[0])
    if best[0] == worst[0]:
        skipped["all_tied"] += 1
        return None
    if best[1].strip() == worst[1].strip():   # the same text scored twice differently: an unstable scorer
        skipped["identical"] += 1
        return None
    return {"prompt": item.prompt, "chosen": best[1], "rejected": worst[1], "chosen_score": best[0],
            "rejected_score": worst[0], "source": item.where}


def run_build_pairs(cfg) -> dict:
    """`kiln dpo build-pairs`: sample dpo.samples answers per prompt from the base, rank them, write the pairs
    (dpo.pairs_out, default <run_dir>/pairs.jsonl) and a report beside them (<name>.report.json)."""
    import torch

    from kiln.config.rundir import write_json_atomic, write_text_atomic
    from kiln.formats.checkpoint import load_model
    from kiln.post.common import base_checkpoint, default_base, run_dir_of
    from kiln.runtime.device import pick_device
    from kiln.tokenizer import Tokenizer
    sec = cfg.dpo
    if not sec.prompts:
        raise ValueError("dpo.prompts is empty: give JSONL files of {\"prompt\", \"answer\"?} or "
                         "reasoning-gym:TASK (e.g. --dpo.prompts '[reasoning-gym:basic_arithmetic]')")
    prompt_tally = Tally()
    items, task = read_prompts(sec.prompts, sec.count, sec.train.seed, prompt_tally, sec.task_config)
    score, scored_by = scorer_of(sec.scorer, task, sec.scorer_timeout)
    if score is None and not any(it.reference for it in items):   # (a reasoning-gym task always gives a score)
        raise ValueError(f"dpo.prompts {sec.prompts}: nothing can rank the samples: the prompts carry no "
                         "\"answer\" and no dpo.scorer is set; give `--dpo.scorer path.py:function` (called as "
                         "(prompt, answer, item) -> float) or reference answers")
    base = base_checkpoint(sec.base or default_base(cfg, "dpo"))
    device = pick_device(sec.train.device)
    model, _ = load_model(base, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = Tokenizer.from_file(run_dir_of(base) / "tokenizer" / "tokenizer.json")
    print(f"build-pairs: {len(items)} prompts from {', '.join(sec.prompts)}; model {base}; ranked by {scored_by}")
    samples = sample_answers(model, tok, items, sec.samples, sec.temperature, sec.max_new_tokens, sec.train.seed)
    report: dict[str, Any] = {"base": str(base), "scored_by": scored_by, "prompts": prompt_tally.as_dict(),
                              "samples_per_prompt": sec.samples, "pairs": 0, "skipped": Counter(),
                              "empty_samples": 0, "unfinished_samples": 0, "scorer_errors": 0,
                              "scorer_error_examples": []}
    records = []
    for it, answers in zip(items, samples):
        if answers is None:
            report["skipped"]["prompt_too_long"] += 1
            continue
        # The verifier scores its own task's items; a prompt file's items beside them go by their reference.
        by = score if sec.scorer or task is None or it.where.startswith("reasoning-gym:") else None
        rec = rank_samples(it, answers, by, report)
        if rec is not None:
            records.append(rec)
    report["pairs"] = len(records)
    scored = [r for r in records if "chosen_score" in r]
    if scored:
        report["mean_chosen_score"] = sum(r["chosen_score"] for r in scored) / len(scored)
        report["mean_rejected_score"] = sum(r["rejected_score"] for r in scored) / len(scored)
    report["skipped"] = dict(sorted(report["skipped"].items()))
    out = Path(sec.pairs_out) if sec.pairs_out else cfg.run_path / "pairs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    report_path = out.with_name(out.stem + ".report.json")
    write_json_atomic(report_path, report)
    print(f"build-pairs: {len(records)} pairs from {len(items)} prompts -> {out}; skipped {report['skipped'] or 'none'}"
          f"; {report['scorer_errors']} scorer errors ({report_path})")
    if not records:
        print(f"warning: no pair was built (skipped: {report['skipped'] or 'none'}); a model that answers every prompt "
              "alike needs a higher dpo.temperature or more dpo.samples, prompts longer than the context are skipped",
              file=sys.stderr)
    if report["scorer_errors"]:
        print(f"warning: the scorer failed on {report['scorer_errors']} samples (left out); first: "
              f"{report['scorer_error_examples'][0]}", file=sys.stderr)
    return report

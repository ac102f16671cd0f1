"""`kiln eval`: everything the evaluation stage measures about one checkpoint, written under `eval/`.

    metrics.json        loss, perplexity and bits per byte on the validation split and on eval.files, the
                        train/val gap, baselines, divergence warnings from the training curves
    report_card.json    one row per benchmark score with what it takes to reproduce it
    benchmarks.json     the benchmarks' per-item details (predictions, generations, outcomes)
    memorisation.json   greedy continuations of training and unseen prefixes against the training tokens
    suites.json         the prompt suites answered by several checkpoints, side by side
    samples.json        sampled generations from eval.prompts

Each part runs when what it needs is there: an imported model has no validation split or training
tokens, so it gets the benchmarks, files and suites it is given, and the rest is skipped with a note.
"""

from __future__ import annotations

import glob
import math
import time
from pathlib import Path

import torch

from kiln.config import Config
from kiln.config.rundir import RunDir, write_json_atomic
from kiln.eval.divergence import divergence_of
from kiln.eval.evaluate import score, unigram_loss
from kiln.eval.scoring import Scorer, perplexity_stats
from kiln.formats.checkpoint import complete_checkpoints, load_model, read_state, resolve_checkpoint, step_of
from kiln.runtime.device import pick_device, use_bf16
from kiln.tokenizer.loader import PackedLoader


def run_eval(cfg: Config) -> dict:
    from kiln.tokenizer import Tokenizer

    e = cfg.eval
    rd = RunDir(cfg.run_path)
    ckpt = resolve_checkpoint(rd.checkpoints, e.checkpoint)
    device = pick_device(cfg.train.device)
    bf16 = use_bf16(cfg.train.precision, device)
    model, ckpt_cfg = load_model(ckpt, device)
    tok = Tokenizer.from_file(rd.tokenizer_file())
    chat = chat_mode(e.chat, ckpt, tok)
    scorer = Scorer(model, tok, batch_size=e.batch_size, bf16=bf16, chat=chat)
    t0 = time.perf_counter()
    result: dict = {"checkpoint": str(ckpt), "step": step_of(ckpt), "chat": chat, "skipped": {}}

    if rd.token_files("val"):
        result.update(split_scores(rd, e, model, tok, ckpt_cfg.model.max_seq_len, device, bf16))
    else:
        result["skipped"]["val"] = f"no validation tokens in {rd.tokens / 'val'} (an imported or fine-tuned model: its own text goes in eval.files)"
    if e.files:
        result["files"] = file_scores(scorer, e.files, e.stride)
    result["divergence"] = divergence_of(rd.metrics)
    for w in result["divergence"]["warnings"]:
        print(f"WARNING: {w['message']}")

    rd.eval.mkdir(parents=True, exist_ok=True)
    if e.benchmarks:
        from kiln.eval.benchmarks import run_benchmarks
        card, details = run_benchmarks(scorer, e.benchmarks)
        write_json_atomic(rd.eval / "report_card.json", card)
        write_json_atomic(rd.eval / "benchmarks.json", details)
        result["report_card"] = card
    if e.memorisation.enabled:
        if rd.token_files("train"):
            from kiln.eval.memorisation_run import run_memorisation
            try:
                mem = run_memorisation(scorer, rd, e.memorisation)
            except ValueError as err:   # too few long documents (a tiny split): said, the rest goes on
                result["skipped"]["memorisation"] = str(err)
            else:
                write_json_atomic(rd.eval / "memorisation.json", mem)
                result["memorisation"] = {k: v for k, v in mem.items() if k != "examples"}
        else:
            result["skipped"]["memorisation"] = f"no training tokens in {rd.tokens / 'train'}"
    if e.suites:
        suites = run_suites(rd, e, ckpt, device, bf16, chat)
        write_json_atomic(rd.eval / "suites.json", suites)

    result["samples"] = samples(scorer, e)
    result["seconds"] = time.perf_counter() - t0
    write_json_atomic(rd.eval / "metrics.json", {k: v for k, v in result.items() if k != "samples"})
    write_json_atomic(rd.eval / "samples.json", result["samples"])
    summarise(result)
    return result


def chat_mode(setting: str, ckpt: Path, tok) -> bool:
    """`auto`: a post-trained checkpoint (its state names the base it started from) with a chat template."""
    if setting != "auto":
        return setting == "yes"
    state = read_state(ckpt) if (ckpt / "state.json").is_file() else {}
    return bool(state.get("base")) and tok.chat_template is not None


def split_scores(rd: RunDir, e, model, tok, seq: int, device, bf16: bool) -> dict:
    """The validation split, as many training tokens for the gap, and the unigram/uniform baselines."""
    bs = e.batch_size
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.long)
    val = PackedLoader(rd.token_files("val"), seq, bs, tok.eos_id, shuffle=False, bos_id=tok.bos_id)
    batches = val.rows_per_epoch // bs
    if e.max_batches:
        batches = min(batches, e.max_batches)
    if batches == 0:
        raise ValueError(f"the validation split in {rd.tokens / 'val'} holds fewer than {bs} rows of {seq} tokens; "
                         "raise data.val_fraction or lower eval.batch_size")
    out = {"val": score(model, val, batches, token_bytes, device, bf16)}
    # The same number of training tokens, in the loader's fixed order, for the train/val gap.
    train = PackedLoader(rd.token_files("train"), seq, bs, tok.eos_id, shuffle=False, bos_id=tok.bos_id)
    out["train"] = score(model, train, min(batches, train.rows_per_epoch // bs), token_bytes, device, bf16)
    out["train_val_gap"] = out["val"]["loss"] - out["train"]["loss"]
    out["unigram_baseline_loss"] = unigram_loss(rd.token_files("train"), rd.token_files("val"), tok.vocab_size,
                                                (tok.eos_id, tok.bos_id))
    out["uniform_baseline_loss"] = math.log(tok.vocab_size)
    return out


def file_scores(scorer: Scorer, patterns: list[str], stride: int) -> dict[str, dict]:
    """Loss, perplexity and bits per byte of each text file, scored whole by sliding windows."""
    out = {}
    for pattern in patterns:
        paths = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True)) or [Path(pattern)]
        for path in paths:
            if not path.is_file():
                raise ValueError(f"eval.files: {path} is not a file (give text files or globs that match some)")
            raw = path.read_bytes()
            text = raw.decode("utf-8", errors="replace")
            if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
                print(f"eval.files: {path} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
            if not text.strip():
                raise ValueError(f"eval.files: {path} is empty")
            s = scorer.loglikelihood_rolling([text], stride or None)[0]
            out[str(path)] = {**perplexity_stats(-s.logprob, s.n_tokens, len(text.encode("utf-8"))),
                              "stride": stride or scorer.max_len, "window": scorer.max_len}
    return out


def run_suites(rd: RunDir, e, ckpt: Path, device, bf16: bool, chat: bool) -> dict:
    """The suites answered greedily by `e.suite_checkpoints` checkpoints of the run (the evaluated one last)."""
    from kiln.eval.suites import answer_suites, load_suite, side_by_side, spaced
    from kiln.tokenizer import Tokenizer

    suites = {Path(p).stem: load_suite(Path(p)) for p in e.suites}
    others = [c for c in complete_checkpoints(rd.checkpoints) if c.resolve() != ckpt.resolve()]
    chosen = [*spaced(others, e.suite_checkpoints - 1), ckpt] if e.suite_checkpoints > 1 else [ckpt]
    tok = Tokenizer.from_file(rd.tokenizer_file())
    answers = {}
    for c in chosen:
        model, _ = load_model(c, device)
        scorer = Scorer(model, tok, batch_size=e.batch_size, bf16=bf16, chat=chat)
        answers[c.name] = answer_suites(suites, lambda ps, n, s=scorer: [a[0] for a in s.generate_many(ps, n)],
                                        e.max_new_tokens)
        del model, scorer   # one checkpoint's weights and engine at a time
    return {"checkpoints": [c.name for c in chosen], "rows": side_by_side(suites, answers)}


def samples(scorer: Scorer, e) -> list[dict]:
    """One sampled completion per prompt (temperature and top-k of eval), seeded by its position."""
    from kiln.infer.generate import generate

    out = []
    for i, prompt in enumerate(e.prompts):
        ids = generate(scorer.model, scorer.prompt_ids(prompt), max_new_tokens=e.max_new_tokens,
                       temperature=e.temperature, top_k=e.top_k, stop_ids=tuple(scorer.tok.stop_ids), seed=i)
        out.append({"prompt": prompt, "completion": scorer.tok.decode(ids)})
    return out


def summarise(result: dict) -> None:
    if "val" in result:
        v = result["val"]
        print(f"eval ({result['step']} steps): val loss {v['loss']:.4f}, ppl {v['perplexity']:.2f}, "
              f"{v['bits_per_byte']:.3f} bits/byte over {v['tokens']} tokens; train loss {result['train']['loss']:.4f} "
              f"(gap {result['train_val_gap']:+.4f}); unigram baseline {result['unigram_baseline_loss']:.4f}")
    for path, f in result.get("files", {}).items():
        print(f"{path}: loss {f['loss']:.4f}, ppl {f['perplexity']:.2f}, {f['bits_per_byte']:.3f} bits/byte "
              f"over {f['tokens']} tokens")
    if result.get("report_card"):
        from kiln.eval.report_card import render_table
        print(render_table(result["report_card"]))
    if "memorisation" in result:
        m = result["memorisation"]
        for group, g in m["groups"].items():
            print(f"memorisation, {group} prefixes: {g['share_at_threshold']:.1%} of {g['n']} greedy continuations "
                  f"share >= {m['threshold']} tokens with the training data (longest {g['max_longest']})")
    for what, why in result["skipped"].items():
        print(f"skipped {what}: {why}")
    for s in result["samples"]:
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")

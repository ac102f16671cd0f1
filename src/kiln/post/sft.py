"""`kiln sft`: supervised fine-tuning, a task of the one loop (kiln/train/loop.py).

Conversations are rendered with the base's chat template (kiln's own or an imported model's); the loss
covers the assistant's tokens only, every assistant turn, each with its end-of-turn token
(kiln/tokenizer/assistant_mask.py). Rows are either packed (several conversations per row, a document
mask so attention and positions never cross conversations: every conversation is computed as if alone)
or padded (one conversation per row, padded to the longest in its micro-batch). docs/decisions.md says
which is the default and why.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.post.common import (Stage, finish, fingerprint_of, load_base, run_stage, trained_positions, trainer,
                              varying_length)
from kiln.tokenizer.loader import IGNORE
from kiln.train import loop
from kiln.train.distributed import Dist, sum_over_ranks
from kiln.train.setup import eval_model, full_weights_here

Example = tuple[np.ndarray, np.ndarray]   # (inputs, targets) of one conversation, int64, same length


def example_of(ids: Sequence[int], mask: Sequence[bool]) -> Example:
    """Next-token pairs of one conversation: the target at t is token t + 1 when that token is trained on."""
    ids_a = np.asarray(ids, dtype=np.int64)
    mask_a = np.asarray(mask, dtype=bool)
    return ids_a[:-1], np.where(mask_a[1:], ids_a[1:], IGNORE)


# ---------------------------------------------------------------- rows and batches

def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int, rng: np.random.Generator | None = None
              ) -> list[list[int]]:
    """Examples packed into rows of at most seq_len tokens, best fit decreasing (the loader's
    `bestfit_rows`): far fewer padded positions than filling rows in order (docs/decisions.md). Examples are
    never split. `order` breaks ties between equal lengths; `rng` shuffles the rows (the order they train in)."""
    from kiln.tokenizer.packing import bestfit_rows
    order_a = np.asarray(order, dtype=np.int64)
    (row, col), fill = bestfit_rows(np.asarray(lengths, dtype=np.int64)[order_a], seq_len)
    rows: list[list[int]] = [[] for _ in range(len(fill))]
    for k in np.lexsort((col, row)).tolist():
        rows[row[k]].append(int(order_a[k]))
    if rng is not None:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


class ChatBatches:
    """Endless micro-batches of conversations for one rank: dicts of `input_ids`, `targets` (B, T) and, when
    packed, `segments` (B, T) (each token's conversation within its row). Resumable: the state is the epoch and
    the position in this rank's row stream of that epoch.

    Two more keys, on by default (an H100 SFT step of SmolLM2's shape: 64.4 -> 56.5 ms with both; BENCHMARKS.md):
    `rows` (N,) with `trained_rows` (the flat indices of the trained targets: the head runs there only), and
    `cu_seqlens` (S,) with `document_bounds` (packed rows' segments as bounds in the flattened batch:
    variable-length flash attention on CUDA in 16-bit instead of the dense mask, which stays for the rest; the
    SFT stage asks for them where `kiln.model.llama.varlen_supported`)."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, packing: str, pad_id: int,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, trained_rows: bool = True,
                 document_bounds: bool = True):
        if not examples:
            raise ValueError("no conversations to train on")
        self.trained_rows, self.document_bounds = trained_rows, document_bounds
        self.examples, self.seq_len, self.batch_size, self.packing = examples, seq_len, batch_size, packing
        self.pad_id, self.seed, self.shuffle, self.rank, self.world = pad_id, seed, shuffle, rank, world_size
        self.lengths = [len(x) for x, _ in examples]
        self.epoch, self.pos = 0, 0
        self._rows = self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        order = np.arange(len(self.examples))
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        if rng is not None:
            order = rng.permutation(order)
        rows = pack_rows(self.lengths, order, self.seq_len, rng) if self.packing == "pack" else \
            [[int(i)] for i in order]
        mine = rows[self.rank::self.world]
        if not mine:   # fewer rows than ranks: every rank still gets work (a repeated row)
            mine = [rows[self.rank % len(rows)]]
        return mine

    @property
    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows(0))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            if self.pos >= len(self._rows):
                self.epoch, self.pos = self.epoch + 1, 0
                self._rows = self._epoch_rows(self.epoch)
            rows.append(self._rows[self.pos])
            self.pos += 1
        return self.collate(rows)

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        if self.packing == "pack":
            T = self.seq_len                   # one shape for every batch (compile, CUDA allocator)
        else:                                  # padded to the longest, rounded up to 16 to limit shapes
            T = min(self.seq_len, -(-max(sum(self.lengths[i] for i in r) for r in rows) // 16) * 16)
        B = len(rows)
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), IGNORE, dtype=np.int64)
        seg = np.zeros((B, T), dtype=np.int64)
        starts = []                            # each segment's first index in the flattened (B * T) batch
        for b, row in enumerate(rows):
            at = 0
            for k, i in enumerate(row):
                xi, yi = self.examples[i]
                x[b, at:at + len(xi)], y[b, at:at + len(xi)], seg[b, at:at + len(xi)] = xi, yi, k
                starts.append(b * T + at)
                at += len(xi)
            seg[b, at:] = len(row)             # padding: a segment of its own, after the last conversation
            if at < T:
                starts.append(b * T + at)
        out = {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y)}
        if self.trained_rows:
            out["rows"] = trained_positions(y)
        if self.packing == "pack":
            out["segments"] = torch.from_numpy(seg)
            if self.document_bounds:
                out["cu_seqlens"] = torch.tensor(starts + [B * T], dtype=torch.int32)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("examples") != len(self.examples):
            raise ValueError(f"the checkpoint was trained on {state.get('examples')} conversations, this run has "
                             f"{len(self.examples)}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._rows = self._epoch_rows(self.epoch)


# ---------------------------------------------------------------- loss

def chat_loss(model: nn.Module, batch: loop.Batch) -> torch.Tensor:
    """Summed cross-entropy over the trained (assistant) targets; packed rows carry their document mask, and
    the batch's `rows` and `cu_seqlens`, where present, go to the model (ChatBatches)."""
    rows, bounds = batch.get("rows"), batch.get("cu_seqlens")
    varying_length(rows, bounds)
    return model(batch["input_ids"], batch["targets"], reduction="sum", segments_BT=batch.get("segments"),
                 rows_N=rows, cu_seqlens_S=bounds)


def count_targets(batch: loop.Batch) -> torch.Tensor:
    return (batch["targets"] != IGNORE).sum()


@torch.no_grad()
def validation_loss(model: nn.Module, batches: ChatBatches, n_batches: int, device: torch.device, bf16: bool,
                    d: Dist = Dist()) -> float:
    """Loss per assistant token over the first n_batches of the fixed validation order, pooled over ranks."""
    from kiln.runtime.device import autocast
    model.eval()
    batches.load_state_dict({"epoch": 0, "pos": 0, "examples": len(batches.examples)})
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(n_batches):
        b = {k: v.to(device) for k, v in next(batches).items()}
        with autocast(device, bf16):
            nats += chat_loss(model, b).double()
        count += count_targets(b).double()
    model.train()
    return (sum_over_ranks(nats, d) / sum_over_ranks(count, d).clamp(min=1)).item()


# ---------------------------------------------------------------- the stage

def encode_all(tok, conversations, seq_len: int, val_fraction: float) -> tuple[list[Example], list[Example], dict]:
    """Every conversation encoded with its assistant mask and split into train / validation by a hash of its
    text; conversations that cannot be rendered or have nothing to train on are counted with their source."""
    import xxhash

    from kiln.tokenizer.assistant_mask import encode_conversation
    train, val = [], []
    report: dict[str, Any] = {"encoded": 0, "truncated": 0, "rejected": {}, "rejected_examples": []}
    for conv in conversations:
        try:
            enc = encode_conversation(tok, conv.messages, max_len=seq_len + 1)
        except ValueError as e:   # no assistant turn, a role the template refuses, ...
            reason = type(e).__name__ if type(e) is not ValueError else "unrenderable"
            report["rejected"][reason] = report["rejected"].get(reason, 0) + 1
            if len(report["rejected_examples"]) < 20:
                report["rejected_examples"].append({"source": conv.source, "error": str(e)[:300]})
            continue
        ex = example_of(enc.ids, enc.mask)
        if not (ex[1] != IGNORE).any():   # cut so short that no assistant token is left
            report["rejected"]["nothing_to_train"] = report["rejected"].get("nothing_to_train", 0) + 1
            continue
        report["encoded"] += 1
        report["truncated"] += int(enc.truncated)
        key = xxhash.xxh64_intdigest("\x1e".join(m["content"] for m in conv.messages).encode("utf-8", "surrogatepass"))
        is_val = (key % 10_000) < val_fraction * 10_000
        (val if is_val else train).append(ex)
    return train, val, report


def data_summary(data: dict, encoding: dict) -> str:
    """One line of where the records went: read, kept, dropped and quarantined by reason, rejected at encoding."""
    quarantined = {r: q["count"] for r, q in data["quarantine"].items()}
    parts = [f"{data['records_in']} records read, {data['kept']} kept"]
    if data["dropped"]:
        parts.append(f"dropped {data['dropped']}")
        if any(r.startswith("language_") or r == "low_score" for r in data["dropped"]):
            parts.append("language ID is unsure of short exchanges: --sft.data.languages '[]' keeps every language")
    if quarantined:
        parts.append(f"quarantined {quarantined}")
    if encoding["rejected"]:
        parts.append(f"rejected at encoding {encoding['rejected']}")
    if data["skipped_files"]:
        parts.append(f"{len(data['skipped_files'])} files skipped")
    return "; ".join(parts)


def run_sft(cfg) -> dict:
    return run_stage(cfg, "sft", _sft)


def _sft(st: Stage) -> dict:
    import json

    from kiln.post.chat_data import load_conversations
    sec, t = st.section, st.cfg.train
    seq_len = t.seq_len   # sft.max_seq_len within the model's context (stage_config)
    convs, data_report = load_conversations(sec.data)
    train, val, enc_report = encode_all(st.tok, convs, seq_len, sec.data.val_fraction)
    report = {"data": data_report, "encoding": enc_report, "train_conversations": len(train),
              "val_conversations": len(val),
              "train_assistant_tokens": int(sum((y != IGNORE).sum() for _, y in train)),
              "train_tokens": int(sum(len(x) for x, _ in train))}
    if st.d.is_main:   # written before any check below, so that a run that stops here can be read
        (st.rd.root / "data_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not train:
        raise ValueError(f"sft: none of the {len(convs)} conversations has assistant tokens to train on: "
                         f"{data_summary(data_report, enc_report)} (details: {st.rd.root / 'data_report.json'})")
    st.say(f"sft data: {len(train)} train / {len(val)} val conversations, {report['train_tokens']} tokens of which "
           f"{report['train_assistant_tokens']} assistant targets; {enc_report['truncated']} truncated to {seq_len}; "
           f"rejected {enc_report['rejected'] or 'none'} (data_report.json)")

    fingerprint = {"data": fingerprint_of([x.tolist() for x, _ in train[:2000]], len(train), report["train_tokens"]),
                   "base": str(st.base), "packing": sec.packing}
    if st.device.type == "cuda":   # the plan's figures for this run, and a warning before one that cannot fit
        from kiln.plan.estimate import startup_estimate
        share = report["train_assistant_tokens"] / max(report["train_tokens"], 1)
        for line in startup_estimate(st.cfg, torch.cuda.mem_get_info(st.device)[0],
                                     torch.cuda.get_device_name(st.device), st.d.world_size, sec.lora, share,
                                     "sft.train"):
            st.say(line)
    model = load_base(st)
    tr = trainer(st, model, fingerprint)
    d = st.d
    from kiln.model.llama import varlen_supported
    from kiln.runtime.device import use_bf16
    # The documents' bounds, where the flash kernel takes them; else the dense document mask alone.
    bounds = varlen_supported(st.device) and use_bf16(t.precision, st.device)
    if st.device.type == "cuda" and sec.packing == "pack" and not bounds:
        st.say("sft: packed conversations attend through the dense document mask, not variable-length flash "
               "attention (that needs bf16, an Ampere or newer card and torch.nn.attention.varlen)")
    source = ChatBatches(train, seq_len, t.micro_batch_size, sec.packing, st.tok.pad_id, seed=t.seed,
                         rank=d.rank, world_size=d.world_size, document_bounds=bounds)
    tokens_per_epoch = report["train_tokens"]
    epochs = t.max_steps * t.micro_batch_size * tr.accum * d.world_size / max(source.rows_per_epoch * d.world_size, 1)
    st.say(f"sft: {source.rows_per_epoch * d.world_size} rows per epoch ({sec.packing}), {tokens_per_epoch} tokens; "
           f"{t.max_steps} steps are {epochs:.2f} epochs")
    evaluate = None
    if val:
        vsource = ChatBatches(val, seq_len, t.micro_batch_size, sec.packing, st.tok.pad_id, shuffle=False,
                              rank=d.rank, world_size=d.world_size, document_bounds=bounds)
        n_val = max(1, min(t.eval_batches, math.ceil(vsource.rows_per_epoch / t.micro_batch_size)))
        vmodel = eval_model(tr)
        evaluate = lambda: validation_loss(vmodel, vsource, n_val, st.device, tr.amp, d)   # noqa: E731
    sample_here = full_weights_here(tr)

    def sample(step: int) -> None:
        if sample_here:
            print_chat_samples(model, st.tok, t.sample_prompts, t.seed + step)

    task = loop.Task(batches=source, loss=chat_loss, count=count_targets, source=source, evaluate=evaluate,
                     sample=sample)
    ts = loop.start(tr, task, st.say)
    summary = loop.run(tr, task, ts, st.say)
    summary.update(epochs=round(epochs, 3), train_conversations=len(train), val_conversations=len(val))
    if sample_here:
        # room for a whole answer (bounded by the context): a 64-token cap counted long, right answers as
        # replies that never stop
        samples = chat_samples(model, st.tok, t.sample_prompts or DEFAULT_PROMPTS, t.seed, max_new_tokens=256)
        (st.rd.root / "samples.json").write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
        summary["replies_stopped"] = sum(s["stopped"] for s in samples) / len(samples)
    return finish(st, tr, summary)


DEFAULT_PROMPTS = ["Hello! How are you today?", "What is your favourite book?", "Calculate 3 + 4."]


@torch.no_grad()
def chat_samples(model: nn.Module, tok, prompts: list[str], seed: int = 0, max_new_tokens: int = 64,
                 temperature: float = 0.0) -> list[dict]:
    """The model's reply to each prompt as a user turn, through the chat template; `stopped` says whether it
    ended with an end-of-turn token (a chat model must learn to stop)."""
    from kiln.infer.generate import generate
    was_training = model.training
    model.eval()
    out = []
    for i, prompt in enumerate(prompts):
        ids = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        new = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=50,
                       stop_ids=tok.stop_ids, seed=seed + i)
        # generate() drops the stop token: a reply shorter than allowed, with context left, ended on one
        stopped = len(new) < max_new_tokens and len(ids) + len(new) < model.cfg.max_seq_len
        out.append({"prompt": prompt, "reply": tok.decode(new, skip_special=True), "stopped": stopped,
                    "tokens": len(new)})
    model.train(was_training)
    return out


def print_chat_samples(model: nn.Module, tok, prompts: list[str], seed: int) -> None:
    for s in chat_samples(model, tok, prompts, seed, temperature=0.7):
        print(f"--- sample: {s['prompt']!r}\n{s['reply']}{'' if s['stopped'] else ' [no end of turn]'}",
              file=sys.stdout, flush=True)

"""`kiln dpo`: Direct Preference Optimisation (Rafailov et al. 2023), a task of the one loop (kiln/train/loop.py).

Shape legend: B pairs in a micro-batch, T tokens (both sides of every pair padded to one length), N pairs.

A micro-batch holds the B chosen sequences then the B rejected ones as 2B rows of one forward (one pass over
the weights, and the two halves of a pair see the same padding). Each side's log-probability is the sum of
its answer tokens' log-probabilities (the model's per-token cross-entropy, negated; prompt and padding targets
are -100 and count 0). With h = (pi_c - ref_c) - (pi_r - ref_r) per pair:

    sigmoid  -log sigmoid(beta * h)                         DPO (Rafailov et al. 2023, eq. 7)
    ipo      (h - 1 / (2 beta))^2 on per-token MEAN log-probs   IPO (Azar et al. 2023, eq. 17)

IPO averages over each answer's tokens as TRL's DPOTrainer does (`all_logps / loss_mask.sum(-1)` when
loss_type="ipo", after the IPO authors' remark that the squared loss is meant on per-token log-ratios; with
sums, beta's target margin 1 / (2 beta) would have to grow with answer length). The loss returned to the loop is
the SUM over pairs and the count the number of pairs, so the loop's division gives the mean per pair.

The reference policy (dpo.reference):
- precomputed: one no-grad pass over every training and validation pair before the first step, kept in the
  batch source and handed out with each batch; no second model in memory. It is recomputed at every start,
  resume included, from the base weights (the checkpoint is loaded after it), so nothing of it is stored.
  With LoRA it runs with the adapters switched off; they start at zero anyway (lora_B = 0), so the starting
  model IS its base.
- frozen: scored per batch by a frozen full copy of the base (a second model's memory) or, with LoRA, by the
  model itself with its adapters switched off (no extra memory, one more forward per step).

Step 0 is the reference itself: every pair's h = 0 and the loss is log 2 (sigmoid) or 1 / (4 beta^2) (ipo).
Held-out pairs (dpo.val_fraction) are scored before training and at every evaluation: the DPO loss (what the
loop keeps as validation loss), the implicit-reward accuracy and margin, and the policy's own preference
(summed log-prob of chosen > rejected) and log-prob margin; before and after go to <out>/dpo_eval.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.post.common import (Stage, finish, fingerprint_of, load_base, run_stage, trained_positions, trainer,
                              varying_length)
from kiln.post.pairs import EncodedPair, load_pairs, split_pairs
from kiln.tokenizer.loader import IGNORE
from kiln.train import loop
from kiln.train.distributed import Dist, sum_over_ranks

LOSSES = ("sigmoid", "ipo")


# ---------------------------------------------------------------- the losses

def preference_losses(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
                      kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards beta * (pi - ref) of chosen and rejected (B,) each.
    Inputs are the sides' log-probs (B,): summed for sigmoid, per-token means for ipo (`scored_logps`)."""
    rewards_c, rewards_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss={kind!r}: use one of {', '.join(LOSSES)}")
    return losses, rewards_c, rewards_r


def scored_logps(logp_sum: torch.Tensor, n_tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """What the loss compares: the summed log-prob (sigmoid), or its mean per answer token (ipo)."""
    return logp_sum / n_tokens.clamp(min=1) if kind == "ipo" else logp_sum


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-probability (R,) fp32 of each row's target tokens (-100 targets count 0). With `rows` (the
    flat indices of the answer tokens, PairBatches' `rows`) the head runs on those positions only.

    In training the per-token loss (reduction "none") runs kiln's fused head where the run has it (one (N, V)
    block in the compute dtype); scoring without gradients (the reference pass) runs the plain head, whose fp32
    logits of every scored position exist at once (with `rows`, the answers' positions only)."""
    if rows is None:
        return -model(input_ids, targets, reduction="none").sum(-1)
    varying_length(rows)
    per_N = model(input_ids, targets, reduction="none", rows_N=rows)                       # (N,)
    R, T = targets.shape
    return -torch.zeros(R, dtype=per_N.dtype, device=per_N.device).index_add_(0, rows // T, per_N)


def answer_lengths(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE).sum(-1)


# ---------------------------------------------------------------- batches

class PairBatches:
    """Endless micro-batches of B pairs for one rank: `input_ids`, `targets` (2B, T), the B chosen rows then the
    B rejected ones padded to one length; `rows` (N,) with `trained_rows` (the flat indices of the answer tokens:
    the head runs there only); `index` (B,) (the pairs' positions, the key of the reference); `ref`
    (2B,) fp32, the reference's summed log-probs, once `ref` is set (precomputed reference). Resumable: the state
    is the epoch and the position in this rank's share of that epoch's order."""

    def __init__(self, pairs: Sequence[EncodedPair], batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, trained_rows: bool = True):
        if not pairs:
            raise ValueError("no preference pairs to train on")
        self.trained_rows = trained_rows
        self.pairs, self.batch_size, self.seq_len, self.pad_id = list(pairs), batch_size, seq_len, pad_id
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world_size
        self.ref: torch.Tensor | None = None   # (N, 2): chosen, rejected
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = np.arange(len(self.pairs))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        mine = order[self.rank::self.world].tolist()
        return mine or [int(order[self.rank % len(order)])]   # fewer pairs than ranks: a repeated one

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = []
        for _ in range(self.batch_size):
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            idx.append(self._order[self.pos])
            self.pos += 1
        return self.collate(idx)

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        sides = [self.pairs[i].chosen for i in idx] + [self.pairs[i].rejected for i in idx]
        # padded to the longest row, rounded up to 16 to limit the number of shapes (compile, allocator)
        T = min(self.seq_len, -(-max(len(x) for x, _ in sides) // 16) * 16)
        x = np.full((len(sides), T), self.pad_id, dtype=np.int64)
        y = np.full((len(sides), T), IGNORE, dtype=np.int64)
        for r, (xi, yi) in enumerate(sides):
            x[r, :len(xi)], y[r, :len(yi)] = xi, yi
        out = {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y),
               "index": torch.tensor(list(idx), dtype=torch.int64)}
        if self.trained_rows:
            out["rows"] = trained_positions(y)
        if self.ref is not None:
            out["ref"] = torch.cat((self.ref[out["index"], 0], self.ref[out["index"], 1]))
        return out

    def fixed_batches(self, d: Dist) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """Every pair once, in index order, this rank's share (pair i goes to rank i % world): (batch, valid),
        the first `valid` pairs of the batch real. Every rank yields the same number of batches (FSDP's forward
        is a collective): a rank with fewer pairs pads with repeats, which the caller leaves out."""
        mine = list(range(d.rank, len(self.pairs), d.world_size))
        per_rank = -(-len(self.pairs) // d.world_size)
        for at in range(0, per_rank, self.batch_size):
            chunk = mine[at:at + self.batch_size]
            valid = len(chunk)
            chunk = chunk + [chunk[0] if chunk else 0] * (min(self.batch_size, per_rank - at) - valid)
            yield self.collate(chunk), valid

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "pairs": len(self.pairs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pairs") != len(self.pairs):
            raise ValueError(f"the checkpoint was trained on {state.get('pairs')} preference pairs, this run has "
                             f"{len(self.pairs)}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)


def count_pairs(batch: loop.Batch) -> torch.Tensor:
    """The items the loss sums over: pairs (a device tensor, like the batch)."""
    return torch.ones_like(batch["index"]).sum()


# ---------------------------------------------------------------- the reference policy

class Reference:
    """The reference's summed log-probs (2B,) of a batch: its precomputed `ref`, else a forward of `module`
    without gradients (a frozen copy; or the policy with `disable` = its adapters switched off)."""

    def __init__(self, module: nn.Module | None = None, disable: Callable[[], Any] | None = None):
        self.module, self.disable = module, disable

    def __call__(self, batch: loop.Batch) -> torch.Tensor:
        if "ref" in batch:
            return batch["ref"]
        assert self.module is not None, "no precomputed reference in the batch and no reference model"
        with torch.no_grad(), (self.disable() if self.disable is not None else nullcontext()):
            return sequence_logps(self.module, batch["input_ids"], batch["targets"], batch.get("rows"))


@torch.no_grad()
def reference_table(score: Callable[[loop.Batch], torch.Tensor], source: PairBatches, device: torch.device,
                    d: Dist) -> torch.Tensor:
    """(N, 2) fp32 on the CPU: `score`'s summed log-probs of every pair's chosen and rejected answer, each rank
    scoring its share and one all-reduce joining them (the shares are disjoint: a sum is a gather)."""
    n = len(source.pairs)
    table = torch.zeros(n, 2, dtype=torch.float32, device=device)
    saved, source.ref = source.ref, None
    for batch, valid in source.fixed_batches(d):
        b = {k: v.to(device) for k, v in batch.items()}
        B = b["index"].numel()
        logp = score(b).float()
        table[b["index"][:valid], 0] = logp[:valid]
        table[b["index"][:valid], 1] = logp[B:B + valid]
    source.ref = saved
    return sum_over_ranks(table, d).cpu()


# ---------------------------------------------------------------- the objective

class Objective:
    """The DPO loss of a micro-batch, and the figures of the last optimizer step (metrics()). The figures are
    summed on the device; reading them (metrics(), at log steps) is the only host sync."""

    def __init__(self, beta: float, kind: str, reference: Reference, accum: int, device: torch.device,
                 d: Dist = Dist()):
        self.beta, self.kind, self.reference, self.accum, self.d = beta, kind, reference, accum, d
        self.stats = torch.zeros(5, device=device)   # loss, rewards chosen, rewards rejected, correct, pairs
        self.calls = 0

    def loss(self, model: nn.Module, batch: loop.Batch) -> torch.Tensor:
        if self.calls % self.accum == 0:   # the first micro-batch of a step: the figures start over
            self.stats.zero_()
        self.calls += 1
        losses, rc, rr = pair_terms(model, batch, self.reference, self.beta, self.kind)
        self.stats += torch.stack((losses.sum(), rc.sum(), rr.sum(), (rc > rr).float().sum(),
                                   torch.ones_like(rc).sum())).detach()
        return losses.sum()

    def metrics(self) -> dict[str, float]:
        """The last step's mean implicit rewards, their margin, and the share of pairs ranked right. The loop
        logs the step's DPO loss itself (`loss`), so it is not repeated here."""
        loss_sum, rc, rr, correct, n = sum_over_ranks(self.stats, self.d).tolist()   # host sync: log steps only
        n = max(n, 1.0)
        return {"rewards/chosen": rc / n, "rewards/rejected": rr / n, "margin": (rc - rr) / n,
                "accuracy": correct / n}


def pair_terms(model: nn.Module, batch: loop.Batch, reference: Reference, beta: float, kind: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (B,) of a batch: one forward over its 2B rows."""
    logp = sequence_logps(model, batch["input_ids"], batch["targets"], batch.get("rows"))      # (2B,)
    ref = reference(batch).float()
    n = answer_lengths(batch["targets"])
    pi_c, pi_r = scored_logps(logp, n, kind).chunk(2)
    ref_c, ref_r = scored_logps(ref, n, kind).chunk(2)
    return preference_losses(pi_c, pi_r, ref_c, ref_r, beta, kind)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, source: PairBatches, reference: Reference, beta: float, kind: str,
                   device: torch.device, amp: bool, d: Dist = Dist()) -> dict[str, float]:
    """Every held-out pair scored: mean DPO loss, implicit-reward accuracy (share with reward chosen > rejected)
    and margin, and the policy's own preference: the share of pairs whose chosen answer has the higher summed
    log-prob, and the mean log-prob margin (what a before/after shows even at step 0, where the rewards are 0)."""
    from kiln.runtime.device import autocast
    was_training = model.training
    model.eval()
    sums = torch.zeros(8, dtype=torch.float64, device=device)
    for batch, valid in source.fixed_batches(d):
        b = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp):
            logp = sequence_logps(model, b["input_ids"], b["targets"], b.get("rows"))
            ref = reference(b).float()
        n = answer_lengths(b["targets"])
        pi_c, pi_r = scored_logps(logp, n, kind).chunk(2)
        ref_c, ref_r = scored_logps(ref, n, kind).chunk(2)
        losses, rc, rr = preference_losses(pi_c, pi_r, ref_c, ref_r, beta, kind)
        lc, lr = logp.chunk(2)
        v = slice(0, valid)
        B = len(n) // 2
        sums += torch.stack([x.double() for x in (
            losses[v].sum(), rc[v].sum(), rr[v].sum(), (rc[v] > rr[v]).sum(), (lc[v] > lr[v]).sum(),
            (lc[v] - lr[v]).sum(), torch.ones_like(rc[v]).sum(), n[:valid].sum() + n[B:B + valid].sum())])
    model.train(was_training)
    loss, rc, rr, correct, prefer, lmargin, pairs, tokens = sum_over_ranks(sums, d).tolist()
    k = max(pairs, 1.0)
    return {"loss": loss / k, "accuracy": correct / k, "margin": (rc - rr) / k, "rewards/chosen": rc / k,
            "rewards/rejected": rr / k, "logp_accuracy": prefer / k, "logp_margin": lmargin / k,
            "pairs": int(pairs), "answer_tokens": int(tokens)}


# ---------------------------------------------------------------- the stage

def run_dpo(cfg) -> dict:
    files = pair_files(cfg)   # before any setup: a run without pairs stops at once
    return run_stage(cfg, "dpo", lambda st: _dpo(st, files))


def pair_files(cfg, say=print) -> list[str]:
    """dpo.pairs, or else the file `kiln dpo build-pairs` writes (dpo.pairs_out, <run_dir>/pairs.jsonl) when it
    exists."""
    sec = cfg.dpo
    if sec.pairs:
        return list(sec.pairs)
    built = Path(sec.pairs_out) if sec.pairs_out else cfg.run_path / "pairs.jsonl"
    if built.is_file():
        say(f"dpo: dpo.pairs not set; using {built} (written by `kiln dpo build-pairs`)")
        return [str(built)]
    raise ValueError(f"dpo.pairs is empty and {built} does not exist: give JSONL files of {{\"prompt\", "
                     "\"chosen\", \"rejected\"} (--dpo.pairs '[pairs.jsonl]'), or build them from the model's own "
                     "samples first: `kiln dpo build-pairs --dpo.prompts '[reasoning-gym:basic_arithmetic]'`")


def load_split(st: Stage, files: list[str], seq_len: int) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """The training and held-out pairs, every record counted in <out>/pairs_report.json."""
    pairs, tally = load_pairs(st.tok, files, seq_len + 1)
    train, val = split_pairs(pairs, st.section.val_fraction)
    report = {"files": files, "pairs": tally.as_dict(), "train_pairs": len(train), "val_pairs": len(val),
              "max_seq_len": seq_len}
    if st.d.is_main:
        (st.rd.root / "pairs_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    st.say(f"dpo data: {tally.records} records -> {len(train)} train / {len(val)} held-out pairs; {tally.truncated} cut "
           f"to {seq_len} tokens; quarantined {dict(tally.quarantined) or 'none'} (pairs_report.json)")
    if not train:
        raise ValueError(f"dpo: none of the {tally.records} records of {', '.join(files)} is a usable training "
                         f"pair: quarantined {dict(tally.quarantined) or 'none'} (details, with files and lines: "
                         f"{st.rd.root / 'pairs_report.json'})")
    if not val:
        st.say(f"dpo: no held-out pairs (dpo.val_fraction={st.section.val_fraction}): no before/after evaluation")
    return train, val


def _dpo(st: Stage, files: list[str]) -> dict:
    sec, t, d = st.section, st.cfg.train, st.d
    seq_len = t.seq_len   # dpo.max_seq_len within the model's context (stage_config)
    train, val = load_split(st, files, seq_len)
    fingerprint = {"data": fingerprint_of([(p.chosen[0].tolist(), p.rejected[0].tolist()) for p in train[:2000]],
                                          len(train)), "base": str(st.base)}
    frozen = None
    if sec.reference == "frozen" and not sec.lora.enabled:
        from kiln.formats.checkpoint import load_model
        frozen, _ = load_model(st.base, st.device, torch.float32)   # a second full model: the price of `frozen`
        frozen.requires_grad_(False)
    model = load_base(st)
    tr = trainer(st, model, fingerprint)
    kw = dict(batch_size=t.micro_batch_size, seq_len=seq_len, pad_id=st.tok.pad_id)
    source = PairBatches(train, seed=t.seed, rank=d.rank, world_size=d.world_size, **kw)
    vsource = PairBatches(val, shuffle=False, rank=d.rank, world_size=d.world_size, **kw) if val else None

    from kiln.train.setup import eval_model
    vmodel = eval_model(tr)
    disable = None
    if sec.lora.enabled:
        from kiln.train.lora import adapters_disabled
        disable = lambda: adapters_disabled(tr.model)   # noqa: E731
    if sec.reference == "precomputed":
        _precompute(st, tr, vmodel, disable, [s for s in (source, vsource) if s is not None])
        reference = Reference()                  # every batch carries its `ref`
    elif disable is not None:
        reference = Reference(vmodel, disable)   # the policy with its adapters off
    else:
        reference = Reference(frozen)

    evaluate, last = None, {}
    before = None
    if vsource is not None:
        def evaluate_now() -> dict:
            from kiln.runtime.device import sdpa_backend
            with sdpa_backend(t.attention_backend):
                return evaluate_pairs(vmodel, vsource, reference, sec.beta, sec.loss, st.device, tr.amp, d)

        # Before loop.start: on a resume too the model still holds the base weights here.
        before = evaluate_now()
        st.say(f"dpo held-out, before: {_fmt(before)}")

        def evaluate_and_log() -> float:
            last.clear()
            last.update(evaluate_now())
            st.say(f"dpo held-out: {_fmt(last)}")
            return last["loss"]

        evaluate = evaluate_and_log

    objective = Objective(sec.beta, sec.loss, reference, tr.accum, st.device, d)
    task = loop.Task(batches=source, loss=objective.loss, count=count_pairs, source=source, evaluate=evaluate,
                     sample=_sampler(st, tr), metrics=objective.metrics, unit="pair")
    ts = loop.start(tr, task, st.say)
    summary = loop.run(tr, task, ts, st.say)
    summary.update(train_pairs=len(train), val_pairs=len(val), beta=sec.beta, loss_type=sec.loss,
                   reference=sec.reference)
    if vsource is not None:
        after = dict(last) if last else evaluate_now()
        result = {"before": before, "after": after, "step": summary["steps"], "val_pairs": len(val),
                  "beta": sec.beta, "loss": sec.loss}
        summary["dpo_eval"] = result
        if d.is_main:
            (st.rd.root / "dpo_eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        st.say(f"dpo held-out: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, reward margin "
               f"{before['margin']:.4f} -> {after['margin']:.4f}, policy prefers chosen {before['logp_accuracy']:.3f} "
               f"-> {after['logp_accuracy']:.3f} (dpo_eval.json)")
    return finish(st, tr, summary)


def _precompute(st: Stage, tr: loop.Trainer, vmodel: nn.Module, disable, sources: list[PairBatches]) -> None:
    """The reference log-probs of every pair, from the model before any step (see the module docstring)."""
    from kiln.runtime.device import autocast, sdpa_backend
    t0 = time.perf_counter()
    n = sum(len(s.pairs) for s in sources)
    st.say(f"dpo: precomputing the reference log-probs of {n} pairs (one pass of the starting model"
           f"{'; LoRA: adapters off, and they start at zero, so the starting model is this reference' if disable else ''})")
    was_training = vmodel.training
    vmodel.eval()

    def score(b: loop.Batch) -> torch.Tensor:
        with autocast(st.device, tr.amp), (disable() if disable is not None else nullcontext()):
            return sequence_logps(vmodel, b["input_ids"], b["targets"], b.get("rows"))

    with sdpa_backend(st.cfg.train.attention_backend):
        for s in sources:
            s.ref = reference_table(score, s, st.device, st.d)
    vmodel.train(was_training)
    st.say(f"dpo: reference done in {time.perf_counter() - t0:.1f}s")


def _sampler(st: Stage, tr: loop.Trainer) -> Callable[[int], None]:
    from kiln.post.sft import print_chat_samples
    from kiln.train.setup import full_weights_here
    here = full_weights_here(tr)

    def sample(step: int) -> None:
        if here:
            print_chat_samples(tr.model, st.tok, st.cfg.train.sample_prompts, st.cfg.train.seed + step)
    return sample


def _fmt(r: dict) -> str:
    return (f"loss {r['loss']:.4f}, accuracy {r['accuracy']:.3f}, reward margin {r['margin']:.4f}, policy prefers "
            f"chosen {r['logp_accuracy']:.3f} (log-prob margin {r['logp_margin']:.3f}) over {r['pairs']} pairs")

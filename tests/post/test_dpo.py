"""kiln dpo: the sigmoid and IPO losses against their formulas, sequence log-probs against a direct sum, the
batches, the precomputed reference against the frozen one, log 2 at step 0, the stage learning a synthetic
preference on held-out pairs, exact resume, and LoRA with the adapters-off reference."""

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from kiln.config import ModelConfig
from kiln.model.llama import Transformer
from kiln.post.dpo import (Objective, PairBatches, Reference, count_pairs, evaluate_pairs, preference_losses,
                           reference_table, scored_logps, sequence_logps)
from kiln.post.pairs import EncodedPair
from kiln.post.sft import example_of
from kiln.tokenizer.loader import IGNORE
from kiln.train.distributed import Dist

from postkit import post_config


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(depth=2, aspect_ratio=32, head_dim=16, n_kv_heads=1, vocab_size=64,
                                   max_seq_len=32)).eval()


def _pairs(n, seed=0):
    """Random pairs: a shared prompt, then answers of different lengths (the mask: the answer only)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(3, 60, rng.integers(2, 8)).tolist()
        sides = []
        for _ in range(2):
            answer = rng.integers(3, 60, rng.integers(1, 9)).tolist()
            sides.append(example_of(prompt + answer, [False] * len(prompt) + [True] * len(answer)))
        out.append(EncodedPair(sides[0], sides[1], f"mem:{i}", i))
    return out


# ---------------------------------------------------------------- the losses

@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_losses_equal_the_formulas(kind):
    pi_c, pi_r = [-12.5, -3.0, -40.0], [-11.0, -9.5, -38.25]
    ref_c, ref_r = [-12.0, -4.0, -41.0], [-12.0, -9.0, -37.0]
    n_c, n_r = [5, 2, 17], [4, 6, 15]
    beta = 0.3
    t = lambda v: torch.tensor(v, dtype=torch.float64)   # noqa: E731
    nc, nr = torch.tensor(n_c), torch.tensor(n_r)
    losses, rc, rr = preference_losses(scored_logps(t(pi_c), nc, kind), scored_logps(t(pi_r), nr, kind),
                                       scored_logps(t(ref_c), nc, kind), scored_logps(t(ref_r), nr, kind), beta, kind)
    for i in range(3):
        if kind == "sigmoid":   # DPO eq. 7 on summed log-probs
            h = (pi_c[i] - ref_c[i]) - (pi_r[i] - ref_r[i])
            want = -math.log(1 / (1 + math.exp(-beta * h)))
            want_rc, want_rr = beta * (pi_c[i] - ref_c[i]), beta * (pi_r[i] - ref_r[i])
        else:                   # IPO eq. 17 on per-token means (TRL's loss_type="ipo")
            h = (pi_c[i] - ref_c[i]) / n_c[i] - (pi_r[i] - ref_r[i]) / n_r[i]
            want = (h - 1 / (2 * beta)) ** 2
            want_rc, want_rr = beta * (pi_c[i] - ref_c[i]) / n_c[i], beta * (pi_r[i] - ref_r[i]) / n_r[i]
        assert losses[i].item() == pytest.approx(want, rel=1e-12)
        assert (rc[i].item(), rr[i].item()) == pytest.approx((want_rc, want_rr), rel=1e-12)


def test_sequence_logps_sum_the_answer_tokens():
    model = _tiny_model()
    pairs = _pairs(3)
    b = PairBatches(pairs, 3, 32, pad_id=0, shuffle=False).collate([0, 1, 2])
    assert b["rows"].tolist() == (b["targets"].reshape(-1) != IGNORE).nonzero().squeeze(1).tolist()
    got = sequence_logps(model, b["input_ids"], b["targets"])                   # the head at every position
    on_rows = sequence_logps(model, b["input_ids"], b["targets"], b["rows"])   # at the answer tokens only
    logits = model(b["input_ids"]).log_softmax(-1)
    for r in range(6):
        keep = b["targets"][r] != IGNORE
        want = logits[r, keep].gather(-1, b["targets"][r, keep][:, None]).sum()
        assert got[r].item() == pytest.approx(want.item(), rel=1e-5)
        assert on_rows[r].item() == pytest.approx(want.item(), rel=1e-5)
    assert "rows" not in PairBatches(pairs, 3, 32, pad_id=0, trained_rows=False).collate([0])


def test_answer_rows_give_the_gradient_of_every_position():
    """The policy's gradient through the head on the answer tokens only equals the one through every position."""
    model = _tiny_model()
    b = PairBatches(_pairs(3), 3, 32, pad_id=0, shuffle=False).collate([0, 1, 2])

    def grads(rows):
        model.zero_grad()
        sequence_logps(model, b["input_ids"], b["targets"], rows).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for g, w in zip(grads(b["rows"]), grads(None)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- batches

def test_batches_put_chosen_then_rejected_and_resume():
    pairs = _pairs(7)
    src = PairBatches(pairs, 3, 32, pad_id=0, seed=2)
    src.ref = torch.arange(14, dtype=torch.float32).view(7, 2)
    b = next(src)
    assert b["input_ids"].shape[0] == 6 and b["input_ids"].shape[1] % 16 == 0
    for k, i in enumerate(b["index"].tolist()):
        for side, row in ((pairs[i].chosen, k), (pairs[i].rejected, k + 3)):
            assert b["input_ids"][row, :len(side[0])].tolist() == side[0].tolist()
            assert b["targets"][row, :len(side[1])].tolist() == side[1].tolist()
            assert (b["targets"][row, len(side[1]):] == IGNORE).all()
        assert b["ref"][k].item() == 2 * i and b["ref"][k + 3].item() == 2 * i + 1
    assert count_pairs(b).item() == 3
    state = src.state_dict()
    want = [next(src)["index"].tolist() for _ in range(5)]   # crosses epochs
    again = PairBatches(pairs, 3, 32, pad_id=0, seed=2)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [next(again)["index"].tolist() for _ in range(5)] == want
    with pytest.raises(ValueError, match="preference pairs"):
        PairBatches(pairs[:-1], 3, 32, pad_id=0).load_state_dict(state)


def test_fixed_batches_cover_every_pair_once_over_ranks():
    pairs = _pairs(11)
    seen, counts = [], []
    for rank in range(3):
        d = Dist("ddp", rank, 3, rank)
        batches = list(PairBatches(pairs, 2, 32, pad_id=0, rank=rank, world_size=3).fixed_batches(d))
        counts.append(len(batches))
        seen += [i for b, valid in batches for i in b["index"][:valid].tolist()]
    assert sorted(seen) == list(range(11))
    assert len(set(counts)) == 1          # every rank runs as many forwards (FSDP's collectives)


# ---------------------------------------------------------------- the reference

def test_precomputed_reference_equals_the_frozen_one():
    """The one pass before training (index order, its own batches) gives each pair the log-probs a frozen copy
    gives it inside any training batch."""
    model = _tiny_model(1)
    pairs = _pairs(10, seed=5)
    src = PairBatches(pairs, 4, 32, pad_id=0, seed=3)
    table = reference_table(lambda b: sequence_logps(model, b["input_ids"], b["targets"], b.get("rows")), src, torch.device("cpu"),
                            Dist())
    frozen = Reference(model)
    src.ref = table
    for _ in range(4):
        b = next(src)
        live = frozen({k: v for k, v in b.items() if k != "ref"})
        assert torch.allclose(b["ref"], live, rtol=1e-5, atol=1e-5)
    assert not torch.equal(table[:, 0], table[:, 1])


@pytest.mark.parametrize("kind,want", [("sigmoid", math.log(2)), ("ipo", 1 / (4 * 0.2 ** 2))])
def test_step_zero_is_the_reference(kind, want):
    """Policy == reference: every pair's log-ratio difference is 0, so the loss per pair is log 2 (sigmoid) or
    1 / (4 beta^2) (ipo), the rewards 0 and no pair is ranked right."""
    model = _tiny_model(2)
    src = PairBatches(_pairs(8, seed=1), 4, 32, pad_id=0, seed=0)
    src.ref = reference_table(lambda b: sequence_logps(model, b["input_ids"], b["targets"], b.get("rows")), src,
                              torch.device("cpu"), Dist())
    obj = Objective(0.2, kind, Reference(), accum=1, device=torch.device("cpu"))
    b = next(src)
    assert (obj.loss(model, b) / count_pairs(b)).item() == pytest.approx(want, rel=1e-5)
    m = obj.metrics()
    assert m["accuracy"] == 0 and abs(m["margin"]) < 1e-6 and abs(m["rewards/chosen"]) < 1e-6
    ev = evaluate_pairs(model, src, Reference(), 0.2, kind, torch.device("cpu"), False)
    assert ev["loss"] == pytest.approx(want, rel=1e-5) and ev["pairs"] == 8


def test_metrics_are_the_last_steps():
    """With 2 micro-batches per step, metrics() covers the step's two and nothing older."""
    model = _tiny_model(3)
    src = PairBatches(_pairs(12, seed=2), 3, 32, pad_id=0, seed=0)
    src.ref = torch.zeros(12, 2)   # a made-up reference: rewards are beta * the policy's log-probs
    obj = Objective(0.5, "sigmoid", Reference(), accum=2, device=torch.device("cpu"))
    batches = [next(src) for _ in range(4)]
    for b in batches:
        obj.loss(model, b)
    logp = torch.cat([sequence_logps(model, b["input_ids"], b["targets"]).view(2, 3) for b in batches[2:]], 1)
    m = obj.metrics()
    assert m["rewards/chosen"] == pytest.approx(0.5 * logp[0].mean().item(), rel=1e-5)
    assert m["rewards/rejected"] == pytest.approx(0.5 * logp[1].mean().item(), rel=1e-5)
    assert m["accuracy"] == pytest.approx((logp[0] > logp[1]).float().mean().item())


# ---------------------------------------------------------------- the stage

WORDS = "apple river stone cloud green table light north music paper".split()


def _write_pairs(path, n=64, seed=0):
    """A learnable preference: the chosen answer ends with "yes", the rejected one (same words) with "no"."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(3))
        answer = " ".join(rng.choice(WORDS) for _ in range(4))
        lines.append(json.dumps({"prompt": f"tell me {question}", "chosen": f"{answer} yes",
                                 "rejected": f"{answer} no"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _dpo_config(run, pairs, **over):
    train = {"max_steps": 8, "micro_batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "log_every": 1,
             "eval_every": 100, "checkpoint_every": 100, **over.pop("train", {})}
    return post_config(run, "dpo", pairs=[str(pairs)], val_fraction=0.25, train=train, **over)


def _log(run, key="loss"):
    rows = [json.loads(line) for line in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get(key)) for r in rows if key in r]


def test_dpo_learns_a_held_out_preference(base_run, tmp_path):
    from kiln.post.dpo import run_dpo
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    summary = run_dpo(_dpo_config(base_run, pairs))
    out = base_run / "dpo"
    first = _log(base_run)[0]
    assert first[0] == 1 and first[1] == pytest.approx(math.log(2), abs=1e-4)   # step 1 runs on the reference
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"rewards/chosen", "rewards/rejected", "margin", "accuracy", "val_loss"} <= set(row)
    ev = json.loads((out / "dpo_eval.json").read_text())
    before, after = ev["before"], ev["after"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5) and before["accuracy"] == 0
    assert after["accuracy"] >= 0.9 and after["margin"] > 0.1 and after["loss"] < before["loss"] - 0.05
    assert after["logp_margin"] > before["logp_margin"] + 1.0     # the policy itself moved toward "yes"
    assert after["pairs"] == before["pairs"] == summary["val_pairs"] > 0
    assert summary["dpo_eval"] == ev and summary["train_pairs"] + summary["val_pairs"] == 64
    report = json.loads((out / "pairs_report.json").read_text())
    assert report["pairs"]["records"] == report["pairs"]["kept"] == 64


def test_resume_gives_the_same_losses(base_run, tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl", n=40, seed=1)
    other = tmp_path / "other"
    shutil.copytree(base_run, other)
    from kiln.post.dpo import run_dpo
    train = {"max_steps": 6, "checkpoint_every": 3, "micro_batch_size": 4}
    run_dpo(_dpo_config(base_run, pairs, train=train))
    run_dpo(_dpo_config(other, pairs, train=train))
    shutil.rmtree(other / "dpo" / "checkpoints" / "step_0000006")   # interrupted after step 3
    run_dpo(_dpo_config(other, pairs, train={**train, "resume": True}))
    for key in ("loss", "margin", "accuracy", "val_loss"):
        assert _log(base_run, key) == _log(other, key), key
    assert len(_log(base_run)) == 6


def test_lora_dpo_with_adapters_off_as_reference(base_run, tmp_path):
    from safetensors.torch import load_file

    from kiln.post.dpo import run_dpo
    pairs = _write_pairs(tmp_path / "pairs.jsonl", n=40, seed=2)
    summary = run_dpo(_dpo_config(base_run, pairs, reference="frozen", lora={"enabled": True, "rank": 4},
                                  train={"max_steps": 4, "lr": 1e-2}))
    adapter = base_run / "dpo" / "adapter"
    assert summary["adapter"] == str(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())   # trained away from zero
    ev = summary["dpo_eval"]
    assert ev["before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)   # zero adapters: policy == reference
    assert ev["after"]["margin"] > ev["before"]["margin"]
    assert _log(base_run)[0][1] == pytest.approx(math.log(2), abs=1e-4)


def test_no_pairs_is_a_clear_error(base_run):
    from kiln.post.dpo import run_dpo
    with pytest.raises(ValueError, match="build-pairs"):
        run_dpo(post_config(base_run, "dpo"))

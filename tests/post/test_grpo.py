"""kiln grpo: the clipped surrogate and KL against a hand computation, group-normalised advantages, rows and stop
tokens, rewards (a raising reward function is counted and not trained on), the batch source's resume, and the
stage end to end: a reward that rises with training, exact resume, LoRA with its adapters-off reference."""

import json
import math
import shutil
import statistics

import pytest
import torch

from kiln.config import GRPOConfig, ModelConfig
from kiln.formats.checkpoint import latest_checkpoint, load_model
from kiln.infer.engine import Engine
from kiln.infer.sampling import SamplingParams
from kiln.model.llama import Transformer
from kiln.post.grpo import GRPOLoss, load_problems, step_metrics
from kiln.post.rollouts import Rewarder, Rollouts, build_rows, group_advantages, sample_completions
from kiln.post.reasoning import load_function, make_task
from kiln.tokenizer.loader import IGNORE

from postkit import post_config

FNS = '''
def items(n=200):
    return [{"question": f"q{i}", "answer": str(i % 7)} for i in range(n)]

def has_e(prompt, completion, item):
    return float("e" in completion)

def flaky(prompt, completion, item):
    if item.answer == "3":
        raise RuntimeError("boom on " + item.question)
    return float("e" in completion)
'''


@pytest.fixture
def fns(tmp_path):
    """A user task (`items`) and reward functions, as a user would give them: `path.py:function`."""
    path = tmp_path / "grpo_fns.py"
    path.write_text(FNS)
    return path


def _tiny(vocab=64, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(depth=1, aspect_ratio=32, head_dim=16, n_kv_heads=1, vocab_size=vocab,
                                   max_seq_len=32))


# ---------------------------------------------------------------- loss and advantages

def test_loss_matches_a_hand_computation_with_clipping_and_kl():
    model = _tiny()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    x, nxt = ids[:, :-1], ids[:, 1:]
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3:] = True          # a 5-token completion after a 4-token prompt
    mask[1, 5:7] = True         # a 2-token one, then padding
    y = torch.where(mask, nxt, IGNORE)
    # the policy's log-probs by another path than the loss's: full logits, log-softmax, gather
    with torch.no_grad():
        logp = model(x).log_softmax(-1).gather(-1, nxt[..., None])[..., 0]
    shifts = torch.tensor([[0, 0, 0, 0.5, -0.5, 0.1, -0.02, 0.3], [0, 0, 0, 0, 0, -0.4, 0.6, 0]])
    old = torch.where(mask, logp - shifts, 0.0)          # r = exp(shift): 1.65, 0.61 (clipped), 1.1, ...
    ref = torch.where(mask, logp + 0.3 * shifts.flip(-1) - 0.1, 0.0)
    adv = torch.tensor([1.5, -0.8])
    batch = {"input_ids": x, "targets": y, "mask": mask, "advantages": adv, "old_logp": old, "ref_logp": ref}
    eps, beta = 0.2, 0.05
    want, clipped = 0.0, 0
    for b in range(2):
        for t in range(8):
            if not mask[b, t]:
                continue
            r = math.exp(float(logp[b, t] - old[b, t]))
            a = float(adv[b])
            surrogate = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            clipped += min(max(r, 1 - eps), 1 + eps) * a < r * a
            d = float(ref[b, t] - logp[b, t])
            want += -surrogate + beta * (math.exp(d) - d - 1)
    assert clipped >= 2                                  # the clip binds for both signs of A
    loss = GRPOLoss(eps, beta)
    got = loss(model, batch)
    assert got.item() == pytest.approx(want, rel=1e-5)
    kl_sum, n_clipped, tokens = loss.take_stats().tolist()
    assert (n_clipped, tokens) == (clipped, mask.sum().item()) and kl_sum > 0
    # without KL, where every token is clipped the surrogate is a constant: no gradient at all
    all_clipped = {**batch, "old_logp": torch.where(mask, logp - 0.5 * torch.sign(adv)[:, None], 0.0)}
    GRPOLoss(eps, 0.0)(model, all_clipped).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_the_head_on_trained_rows_gives_the_same_loss_gradients_and_stats():
    """Rollouts' batches carry `rows` and (N,) log-probs: the loss must equal the (B, T) masked one."""
    model = _tiny()
    batch = build_rows([[5, 6, 7, 9], [5, 6], [4]], [[8, 9, 1], [8, 3, 3, 1], [7, 1]], [True, False, True],
                       pad_id=2, max_len=32)
    x, y, mask, rows = batch["input_ids"], batch["targets"], batch["mask"], batch["rows"]
    assert rows.tolist() == mask.flatten().nonzero()[:, 0].tolist()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        logp = -model(x, y, reduction="none")
    old = torch.where(mask, logp + 0.3 * torch.randn(mask.shape, generator=g), 0.0)
    ref = torch.where(mask, logp - 0.2 * torch.randn(mask.shape, generator=g), 0.0)
    adv = torch.tensor([1.2, 0.0, -0.7])
    dense = {"input_ids": x, "targets": y, "mask": mask, "advantages": adv, "old_logp": old, "ref_logp": ref}
    sparse = {**dense, "rows": rows, "old_logp": old.flatten()[rows], "ref_logp": ref.flatten()[rows]}
    results = []
    for b in (dense, sparse):
        model.zero_grad()
        loss = GRPOLoss(0.2, 0.05)
        value = loss(model, b)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()], loss.take_stats()))
    (v0, g0, s0), (v1, g1, s1) = results
    assert torch.allclose(v0, v1, rtol=1e-5) and torch.allclose(s0, s1, rtol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_on_policy_ratio_is_one_and_the_gradient_is_reinforce():
    """old_logp = logp (one update per sample): the loss's gradient is -sum A grad log p."""
    model = _tiny()
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[:, :2] = IGNORE
    mask = y != IGNORE
    adv = torch.tensor([1.0, -0.5, 0.25])
    with torch.no_grad():
        old = -model(x, y, reduction="none")
    GRPOLoss(0.2, 0.0)(model, {"input_ids": x, "targets": y, "mask": mask, "advantages": adv, "old_logp": old}
                       ).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (model(x, y, reduction="none") * adv[:, None]).sum().backward()    # -log p weighted by A
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(got, model.parameters()))


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 9.0, 1.0], [3.0, 0, 0, 0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, False, True], [True, False, False, False]])
    adv = group_advantages(rewards, valid)
    for g in (0, 2):
        kept = [float(r) for r, v in zip(rewards[g], valid[g]) if v]
        mean, std = statistics.mean(kept), statistics.stdev(kept)
        want = [(r - mean) / (std + 1e-4) if v else 0.0 for r, v in zip(rewards[g].tolist(), valid[g])]
        assert adv[g].tolist() == pytest.approx(want, rel=1e-5)
    assert adv[2, 2] == 0                         # a dropped sample: no advantage, and not in its group's mean
    assert adv[0].sum().abs() < 1e-6 and adv[0].std().item() == pytest.approx(1.0, rel=1e-3)
    assert not adv[1].any()                       # every reward equal: no signal
    assert not adv[3].any()                       # one valid sample: no baseline


def test_rows_train_on_the_completion_and_its_stop_token_only():
    rows = build_rows([[5, 6, 7], [5, 6]], [[8, 9, 1], [8]], [True, False], pad_id=2, max_len=32)
    x, y, m = rows["input_ids"], rows["targets"], rows["mask"]
    assert x.shape == (2, 16)                     # 5 positions, padded to a multiple of 16
    assert x[0, :5].tolist() == [5, 6, 7, 8, 9] and (x[0, 5:] == 2).all()
    assert y[0, :5].tolist() == [IGNORE, IGNORE, 8, 9, 1]     # the stop token (1) is trained on
    assert m[0].sum() == 3 and not m[1].any()     # the second sample is dropped: nothing trained


# ---------------------------------------------------------------- sampling and rewards

def test_completions_are_cut_after_their_first_stop_token():
    model = _tiny().eval()
    engine = Engine(model, None, max_slots=6, max_len=32, cuda_graphs=False)
    params = [SamplingParams(max_tokens=5, temperature=1.0, n=3, seed=s) for s in (1, 2)]
    free = sample_completions(engine, [[3, 4, 5], [6, 7]], params, stop_ids=set())
    assert [len(c) for p in free for c in p] == [5] * 6
    stops = set(range(64))                        # every token stops: one token each, the stop kept
    cut = sample_completions(engine, [[3, 4, 5], [6, 7]], params, stop_ids=stops)
    assert cut == [[c[:1] for c in p] for p in free]       # the same draws, cut after the first
    assert engine.active_slots == 0 and engine.waiting == 0


def test_default_reward_is_the_verifier_plus_the_format_bonus():
    task = make_task("chain_sum", {}, seed=0, size=2)
    item = task.items[0]
    rw = Rewarder(task, 0.1)
    good = rw(f"<think>\nadd\n</think>\n<answer>{item.answer}</answer>", item)
    assert (good.reward, good.correct, good.formatted) == (pytest.approx(1.1), True, True)
    plain = rw(f"it is {item.answer}", item)
    assert (plain.reward, plain.correct, plain.formatted) == (pytest.approx(1.0), True, False)
    wrong = rw("<think>\n</think>\n<answer>nope</answer>", item)
    assert (wrong.reward, wrong.correct) == (pytest.approx(0.1), False)


def test_a_start_that_cannot_show_the_reward_is_warned_about():
    """The evaluation before training says when samples will never show what the reward pays for."""
    from kiln.config.post import GRPOConfig
    from kiln.post.grpo import start_warnings
    sec = GRPOConfig()
    fine = {"items": 200, "accuracy": 0.2, "format_rate": 0.5}
    assert start_warnings(fine, sec) == []
    no_format = start_warnings({**fine, "format_rate": 0.0}, sec)
    assert len(no_format) == 1 and "none of 200" in no_format[0] and "reasoning-gym:basic_arithmetic" in no_format[0]
    assert start_warnings({**fine, "format_rate": 0.0}, GRPOConfig(format_reward=0.0)) == []   # nothing paid for it
    assert start_warnings({**fine, "format_rate": 0.0}, GRPOConfig(reward="my.py:score")) == []   # the user's reward
    nothing_right = start_warnings({**fine, "accuracy": 0.0}, sec)
    assert len(nothing_right) == 1 and "task_config" in nothing_right[0]


def test_a_reward_function_that_hangs_is_stopped_and_counted():
    """A user's reward that never returns fails its call after grpo.reward_timeout, counted with the reason,
    and the next call works (the alarm is cleared)."""
    import time

    task = make_task("chain_sum", {}, seed=0, size=2)
    item = task.items[0]

    def reward(prompt, completion, it):
        if "loop" in completion:
            while True:
                pass
        return 0.5

    rw = Rewarder(task, 0.1, reward, "fns.py:reward", timeout=0.3)
    t0 = time.monotonic()
    stuck = rw("loop forever", item)
    assert stuck.reward is None and "TimeoutError" in stuck.error and "0.3 s" in stuck.error
    assert time.monotonic() - t0 < 5
    assert rw("fine", item).reward == pytest.approx(0.5)
    time.sleep(0.5)   # no stray alarm left behind to interrupt later code


def test_the_time_limit_puts_an_outer_alarm_back():
    import signal
    import time

    from kiln.runtime.limits import time_limit
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        with time_limit(5):
            time.sleep(0.1)
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 0.5
        time.sleep(0.8)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _rollouts(base, fns, reward, tmp_path=None, **over):
    model, _ = load_model(latest_checkpoint(base / "checkpoints"), "cpu", torch.float32)
    from kiln.tokenizer import Tokenizer
    tok = Tokenizer.from_file(base / "tokenizer" / "tokenizer.json")
    sec = GRPOConfig(**{"task": f"{fns}:items", "system": "", "group_size": 4, "prompts_per_step": 4,
                        "max_new_tokens": 6, "eval_items": 4, **over})
    task, train, held, _ = load_problems(sec, tok, 0, model.cfg.max_seq_len)
    rewarder = Rewarder(task, sec.format_reward, load_function(f"{fns}:{reward}"), reward)
    log = tmp_path / "errors.jsonl" if tmp_path else None
    return Rollouts(model.train(), tok, train, rewarder, sec, torch.device("cpu"), False, seed=0,
                    eval_problems=held, error_log=log, say=lambda *a, **k: None)


def test_a_raising_reward_is_counted_and_not_trained_on(pretrained_base, fns, tmp_path):
    src = _rollouts(pretrained_base, fns, "flaky", tmp_path)
    loss = GRPOLoss(0.2, 0.0)
    dropped_rows = 0
    for _ in range(6):
        b = next(src)
        bad = [p.item.answer == "3" for p in (src.problem(src.batches * 4 - 4 + j) for j in range(4))]
        for j, is_bad in enumerate(bad):
            rows = slice(4 * j, 4 * j + 4)
            assert (not b["mask"][rows].any()) == is_bad       # a failed sample has no trained token
            if is_bad:
                assert not b["advantages"][rows].any()
        dropped_rows += 4 * sum(bad)
        loss(src.policy, b)
    assert dropped_rows > 0                              # the stream did meet the failing items
    m = step_metrics(src, loss, d=_One())
    assert m["reward_errors"] == dropped_rows
    log = [json.loads(ln) for ln in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert len(log) == dropped_rows and all("boom on" in r["error"] and r["answer"] == "3" for r in log)


class _One:
    """Dist of one process (what sum_over_ranks reads)."""
    world_size, rank, is_main = 1, 0, True


def test_the_batch_source_resumes_with_the_same_samples(pretrained_base, fns):
    a = _rollouts(pretrained_base, fns, "has_e")
    next(a)
    state = json.loads(json.dumps(a.state_dict()))
    want = [next(a) for _ in range(2)]
    b = _rollouts(pretrained_base, fns, "has_e")
    b.load_state_dict(state)
    for w in want:
        got = next(b)
        assert all(torch.equal(w[k], got[k]) for k in ("input_ids", "targets", "advantages", "old_logp"))
    with pytest.raises(ValueError, match="grpo problems"):
        b.load_state_dict({**state, "problems": 3})


# ---------------------------------------------------------------- the stage

def _grpo(run, fns, reward="has_e", **over):
    section = {"task": f"{fns}:items", "reward": f"{fns}:{reward}", "system": "", "group_size": 8,
               "prompts_per_step": 4, "max_new_tokens": 8, "eval_items": 8}
    train = {"lr": 1e-2, "log_every": 1, "threads": 1, **over.pop("train", {})}
    return post_config(run, "grpo", **{**section, **over}, train=train)


def _log(run):
    lines = (run / "grpo" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_reward_rises_with_training(base_run, fns):
    """A reward for completions holding an "e": the tiny model learns to write one within a few steps."""
    from kiln.pipeline import run_stage
    summary = run_stage(_grpo(base_run, fns, train={"max_steps": 14, "eval_every": 7, "checkpoint_every": 14}),
                        "grpo")
    log = _log(base_run)
    first, last = (statistics.mean(r["reward"] for r in part) for part in (log[:3], log[-3:]))
    assert last > first + 0.15 and last > 0.85, [round(r["reward"], 3) for r in log]
    assert {"accuracy", "format", "completion_len", "zero_var_groups", "reward_errors", "sample_s"} <= set(log[0])
    assert "kl" not in log[0]
    evals = json.loads((base_run / "grpo" / "grpo_eval.json").read_text())
    assert evals["before"]["items"] == 8 and [e["step"] for e in evals["evaluations"]] == [7, 14]
    assert summary["eval_accuracy_before"] == evals["before"]["accuracy"]
    assert summary["eval_accuracy_after"] == evals["after"]["accuracy"] and summary["reward_errors"] == 0


def test_resume_reproduces_the_uninterrupted_run(base_run, fns, tmp_path):
    """With the KL term on (a frozen copy as the reference): stopped at step 2 and resumed, steps 3 and 4 sample
    the same completions and take the same losses as a run never stopped."""
    from kiln.pipeline import run_stage
    other = tmp_path / "other"
    shutil.copytree(base_run, other)
    common = {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 6, "eval_items": 4, "kl_beta": 0.1}
    steps = {"eval_every": 100, "checkpoint_every": 2}
    run_stage(_grpo(base_run, fns, **common, train={"max_steps": 4, **steps}), "grpo")
    run_stage(_grpo(other, fns, **common, train={"max_steps": 2, **steps}), "grpo")
    run_stage(_grpo(other, fns, **common, train={"max_steps": 4, "resume": True, **steps}), "grpo")
    whole, resumed = _log(base_run), _log(other)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        for key in ("loss", "reward", "kl", "completion_len", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert whole[-1]["kl"] > 0


def test_grpo_with_lora_uses_the_adapters_off_reference(base_run, fns):
    from kiln.pipeline import run_stage
    summary = run_stage(_grpo(base_run, fns, group_size=4, prompts_per_step=2, max_new_tokens=6, eval_items=4,
                              kl_beta=0.1, lora={"enabled": True, "rank": 4},
                              train={"max_steps": 3, "eval_every": 3, "checkpoint_every": 3}), "grpo")
    log = _log(base_run)
    assert log[0]["kl"] == 0          # B = 0 at the start: the policy is its reference exactly
    assert log[-1]["kl"] > 0          # after two updates it is not: the reference really has its adapters off
    assert (base_run / "grpo" / "adapter").is_dir() and summary["adapter"]

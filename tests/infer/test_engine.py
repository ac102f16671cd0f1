"""The batched engine against the one-sequence reference (`generate.py`) and the uncached forward."""

import threading

import pytest
import torch

from kiln.config import ModelConfig
from kiln.infer.decode_step import DecodeStep
from kiln.infer.engine import Engine, QueueFull
from kiln.infer.generate import generate
from kiln.infer.sampling import SamplingParams
from kiln.infer.slots import SlotCache
from kiln.model.llama import Transformer

HEADS = {"mha": dict(), "gqa": dict(n_kv_heads=2), "gqa_qknorm": dict(n_kv_heads=2, qk_norm=True)}
PROMPTS = [[5], [1, 2, 3], [7, 7, 7, 7, 7, 9, 11], list(range(20, 40)), [3, 1, 4, 1, 5, 9, 2, 6], [60] * 12]


def make(init_std=0.3, max_seq_len=48, **kw) -> Transformer:
    # Large init_std: peaked logits, so greedy argmax is no near-tie that batching's rounding could flip.
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, d_model=64, head_dim=16, vocab_size=89, max_seq_len=max_seq_len, init_std=init_std, **kw)
    return Transformer(cfg).eval()


GREEDY = SamplingParams(max_tokens=20, temperature=0)


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "overlap"])
def overlap(request, monkeypatch):
    """Every test twice: reading each step's tokens at once, and one step behind (CUDA's default), where a
    sequence that stops has one more step in flight whose token must be dropped."""
    init = Engine.__init__
    monkeypatch.setattr(Engine, "__init__", lambda self, *a, **k: init(self, *a, **{"overlap": request.param, **k}))
    return request.param


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("min_length_bucket", [128, 8])
@pytest.mark.parametrize("fused", [False, True], ids=["sdpa", "fused"])
def test_batched_greedy_equals_uncached_single_sequence(heads, min_length_bucket, fused, monkeypatch):
    """Every batch size from 1 to all prompts at once (slots = batch), ragged prompts, joins and leaves; the
    decode attending over the whole slot, or over length buckets 8, 16, 32, 48 as the rows grow; through the
    model's RoPE + SDPA, or the one-kernel op (kiln/infer/attention.py; PyTorch arithmetic on the CPU)."""
    monkeypatch.setattr(DecodeStep, "min_length_bucket", min_length_bucket)
    model = make(**HEADS[heads])
    ref = [generate(model, p, 20, temperature=0, use_cache=False) for p in PROMPTS]
    assert len({tuple(r) for r in ref}) > 1   # not a constant output
    for slots in (1, 2, 3, len(PROMPTS)):
        engine = Engine(model, max_slots=slots, prefill_tokens=64, fused_attention=fused)
        engine.decoder.fused_attention_rows = 2   # buckets of 1 and 2 rows fused, 4 and 8 not
        assert engine.decoder.fused_attention == fused
        assert engine.decoder.lengths == ([8, 16, 32, 48] if min_length_bucket == 8 else [48])
        out = engine.generate(PROMPTS, GREEDY)
        assert [o[0] for o in out] == ref, f"{slots} slots"


def test_context_limit_matches_generate():
    model = make(max_seq_len=24)
    prompts = [list(range(1, 21)), [4] * 24]    # 20 + 5 new tokens fill 24; a full prompt gets one
    ref = [generate(model, p, 20, temperature=0) for p in prompts]
    out = Engine(model, max_slots=2).generate(prompts, GREEDY)
    assert [o[0] for o in out] == ref and [len(r) for r in ref] == [5, 1]


def test_decode_logits_match_full_forward_for_ragged_rows():
    model = make(init_std=0.1, n_kv_heads=2)
    rows = [torch.randint(0, 89, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 5)]
    cache = SlotCache.for_model(model, n_slots=3)
    with torch.no_grad():
        lens = [len(r) - 1 for r in rows]   # prefill all but the last token, decode that one
        ids = torch.zeros(3, max(lens), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :lens[b]] = r[:-1]
        h = model.hidden(ids, torch.arange(max(lens)).expand(3, -1), cache.prefill(torch.tensor([2, 0, 1])))
        for b, r in enumerate(rows):
            full = model(r[None, :-1])[0]
            assert (model.lm_head(h[b, :lens[b]]) - full).abs().max() <= 1e-5
        order = [1, 2, 0]                                   # slot s holds row order[s]
        pos = torch.tensor([lens[i] for i in order])
        tok = torch.stack([rows[i][-1] for i in order])[:, None]
        h = model.hidden(tok, pos[:, None], cache.decode(pos), cache.keys_mask(pos))
        for s, i in enumerate(order):
            assert (model.lm_head(h[s, 0]) - model(rows[i][None])[0, -1]).abs().max() <= 1e-5


def test_continuous_batching_joins_between_steps():
    model = make(n_kv_heads=2)
    engine = Engine(model, max_slots=2)
    got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    finished = set()

    def collect(i):
        def f(o):
            got[i].extend(o.token_ids)
            if o.finish_reason:
                finished.add(i)
        return f

    engine.submit(PROMPTS[0], GREEDY, collect(0))
    for _ in range(5):
        engine.step()
    for i in range(1, len(PROMPTS)):            # these wait for a slot, then join mid-flight
        engine.submit(PROMPTS[i], GREEDY, collect(i))
    while len(finished) < len(PROMPTS):
        engine.step()
        assert engine.active_slots <= 2
    assert [got[i] for i in range(len(PROMPTS))] == [generate(model, p, 20, temperature=0) for p in PROMPTS]
    assert engine.active_slots == 0 and sorted(engine._free) == [0, 1]


def test_n_samples_share_one_prefill_and_seed_reproduces():
    model = make(init_std=0.05)
    engine = Engine(model, max_slots=4)
    p = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7)
    a = engine.generate([PROMPTS[2]], p)[0]
    steps = engine.stats["requests"]
    b = engine.generate([PROMPTS[2]], p)[0]
    assert engine.stats["requests"] == steps + 1           # one request, one prefill, three samples
    assert a == b and len({tuple(x) for x in a}) == 3       # seeded: same again; the samples differ
    # The same seed alone and beside another request: batching does not change a seeded sample.
    c = engine.generate([PROMPTS[2], PROMPTS[3]], p)[0]
    assert c == a


def test_sampling_filters_and_penalties():
    model = make(init_std=0.05)
    engine = Engine(model, max_slots=4)
    # top_k=1 is greedy whatever the temperature.
    assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=1))[0][0] == \
        generate(model, PROMPTS[1], 10, temperature=0)
    # min_p=1 keeps only the most likely token: greedy too.
    assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.0, min_p=1.0))[0][0] == \
        generate(model, PROMPTS[1], 10, temperature=0)
    # Penalties under greedy decoding, against a plain loop over the uncached forward.
    params = SamplingParams(max_tokens=30, temperature=0, presence_penalty=0.5, frequency_penalty=0.3,
                            repetition_penalty=1.5)
    prompt = PROMPTS[2]
    out = engine.generate([prompt, PROMPTS[0]], params)[0][0]
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(30):
            logits = model(torch.tensor([prompt + ids]))[0, -1]
            seen = torch.zeros(89, dtype=torch.bool)
            seen[prompt + ids] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / 1.5, logits * 1.5), logits)
            counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=89).float()
            ids.append(int((logits - 0.3 * counts - 0.5 * (counts > 0)).argmax()))
    assert out == ids and out != generate(model, prompt, 30, temperature=0)


def test_stop_ids_and_logprobs():
    model = make()
    ref = generate(model, PROMPTS[3], 20, temperature=0)
    stop = ref[5]
    events = []
    engine = Engine(model, max_slots=2)
    engine.submit(PROMPTS[3], SamplingParams(max_tokens=20, temperature=0, stop_ids=(stop,), logprobs=3,
                                            prompt_logprobs=2), events.append)
    engine.step()
    req_prompt = None
    while not events or events[-1].finish_reason is None:
        engine.step()
    ids = [t for e in events for t in e.token_ids]
    assert ids == ref[:ref.index(stop)] and events[-1].finish_reason == "stop"
    lps = [lp for e in events for lp in e.logprobs]
    full = model(torch.tensor([PROMPTS[3] + ids]))[0].log_softmax(-1)
    for t, lp in enumerate(lps):
        row = full[len(PROMPTS[3]) - 1 + t]
        assert lp.id == ids[t] and abs(lp.logprob - row[ids[t]].item()) < 1e-4
        assert [i for i, _ in lp.top] == row.topk(3).indices.tolist()
    del req_prompt


def test_prompt_logprobs_match_full_forward():
    model = make(init_std=0.1)
    engine = Engine(model, max_slots=2)
    reqs = [engine.submit(p, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2), lambda o: None)
            for p in PROMPTS[2:4]]
    engine.step()
    for r in reqs:
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(r.prompt_ids)
        logp = model(torch.tensor([r.prompt_ids]))[0].log_softmax(-1)
        for t, lp in enumerate(r.prompt_logprobs[1:]):
            assert lp.id == r.prompt_ids[t + 1]
            assert abs(lp.logprob - logp[t, lp.id].item()) < 1e-4
            assert [i for i, _ in lp.top] == logp[t].topk(2).indices.tolist()


def test_cancel_frees_slot_and_queue_limit():
    model = make()
    engine = Engine(model, max_slots=1, max_queue=1)
    events = []
    a = engine.submit(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0), events.append)
    engine.step()
    engine.submit(PROMPTS[1], GREEDY, events.append)
    with pytest.raises(QueueFull):
        engine.submit(PROMPTS[2], GREEDY, events.append)
    engine.cancel(a)
    engine.step()                                # a leaves, the waiting one takes its slot at once
    assert any(e.finish_reason == "abort" for e in events) and engine.active_slots == 1 and engine.waiting == 0
    with pytest.raises(ValueError, match="context"):
        engine.submit(list(range(49)), GREEDY, events.append)


def test_background_thread_serves_concurrent_submitters():
    model = make(n_kv_heads=2)
    engine = Engine(model, max_slots=3).start()
    try:
        results, done = {}, threading.Event()

        def collect(i):
            def f(o):
                results.setdefault(i, []).extend(o.token_ids)
                if o.finish_reason and len([k for k in results if k in finished or k == i]) and finished.add(i) is None \
                        and len(finished) == len(PROMPTS):
                    done.set()
            return f

        finished: set[int] = set()
        for i, p in enumerate(PROMPTS):
            engine.submit(p, GREEDY, collect(i))
        assert done.wait(timeout=30)
        assert [results[i] for i in range(len(PROMPTS))] == [generate(model, p, 20, temperature=0) for p in PROMPTS]
    finally:
        engine.stop()


def test_streamed_text_is_the_whole_decode_for_multibyte_and_invalid_sequences():
    """Incremental detokenization (a window of recent tokens per step) equals decoding the whole output:
    characters split over byte tokens, SentencePiece-free byte-level BPE, special tokens, invalid bytes."""
    import random
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "eval"))
    import evalkit
    from kiln.infer.textstream import TextStream

    tok = evalkit.tokenizer()
    rng = random.Random(0)
    texts = ["café naïve 中文 🙂 done", "The quick brown fox 🦊🦊 jumps", "ÅÄÖ åäö — “quotes” …"]
    cases = [tok.encode(t) for t in texts]
    cases += [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(20)]   # invalid UTF-8, specials
    for ids in cases:
        stream, out = TextStream(), []
        seen = ""
        for i in ids:
            out.append(i)
            text = stream.advance(tok, out)
            assert text.startswith(seen)
            seen = text
        assert stream.final(tok, out) == tok.decode(ids, skip_special=True), ids


def test_prefix_cache_continues_a_finished_conversation(monkeypatch):
    """A prompt extending a finished one's prompt and output reuses its slot: only the new tokens are computed,
    and the tokens equal the uncached reference's and a cache-less engine's, greedy and seeded (n=2)."""
    monkeypatch.setattr(Engine, "min_prefix_tokens", 4)
    model = make(init_std=0.3)
    first = list(range(20, 32))
    engine = Engine(model, max_slots=2)
    out1 = engine.generate([first], SamplingParams(max_tokens=8, temperature=0, ignore_stop_ids=True))[0][0]
    assert engine.stats["cached_prompt_tokens"] == 0
    second = first + out1 + [5, 6, 7]
    got = engine.generate([second], SamplingParams(max_tokens=8, temperature=0))[0][0]
    # 12 prompt tokens + the 7 outputs fed back were cached (the 8th never entered the cache)
    assert engine.stats["cached_prompt_tokens"] == 19
    assert got == generate(model, second, 8, temperature=0, use_cache=False)
    sampled = SamplingParams(max_tokens=6, temperature=0.9, seed=4, n=2)
    third = second + got[:3]
    want = Engine(model, max_slots=2, prefix_cache=False).generate([third], sampled)
    assert engine.generate([third], sampled) == want and engine.stats["cached_prompt_tokens"] > 19


def test_prefix_cache_skips_short_prefixes_and_prompt_logprobs(monkeypatch):
    monkeypatch.setattr(Engine, "min_prefix_tokens", 4)
    model = make(init_std=0.3)
    engine = Engine(model, max_slots=1)
    engine.generate([[1, 2, 3, 9, 9]], SamplingParams(max_tokens=2, temperature=0))
    engine.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(max_tokens=2, temperature=0))   # 3 shared: too few
    assert engine.stats["cached_prompt_tokens"] == 0
    prompt = [1, 2, 3, 4, 5, 6, 7]
    engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), lambda o: None)
    engine.step()
    assert engine.stats["cached_prompt_tokens"] == 0 and engine.active_slots == 0
    same = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0][0]
    assert engine.stats["cached_prompt_tokens"] == 6   # all but the last prompt token: its logits start the output
    assert same == generate(model, prompt, 3, temperature=0, use_cache=False)


def test_without_prefix_cache_a_changed_model_is_recomputed(monkeypatch):
    """prefix_cache=False (GRPO's rollouts, the validation step): weights changed between requests are used for
    the whole prompt, never keys cached under the old ones."""
    monkeypatch.setattr(Engine, "min_prefix_tokens", 4)
    model = make(init_std=0.3)
    prompt = list(range(20, 40))
    engine = Engine(model, max_slots=1, prefix_cache=False)
    engine.generate([prompt], GREEDY)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    got = engine.generate([prompt], GREEDY)[0][0]
    assert engine.stats["cached_prompt_tokens"] == 0
    assert got == generate(model, prompt, 20, temperature=0, use_cache=False)


def test_logit_bias_changes_the_choice_not_the_reported_logprobs():
    """A -100 bias on greedy's choices keeps them out of the answer; the log-probabilities reported for each
    chosen token are the model's own (no bias), so they equal an unbiased engine's for the same tokens."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(depth=2, d_model=32, head_dim=8, vocab_size=53, max_seq_len=64)).eval()
    prompt = [3, 9, 4, 1]
    plain = Engine(model, max_slots=2).generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0][0]
    ban = {t: -100.0 for t in set(plain)}
    outs = []
    engine = Engine(model, max_slots=2)
    engine.submit(prompt, SamplingParams(max_tokens=10, temperature=0, logit_bias=ban, logprobs=2), outs.append)
    while not any(o.finish_reason for o in outs):
        engine.step()
    got = [t for o in outs for t in o.token_ids]
    assert len(got) == 10 and not set(got) & set(plain)
    with torch.no_grad():   # the reported log-probability of each token: the unbiased model's
        logp = model(torch.tensor([prompt + got]))[0].float().log_softmax(-1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(got)]
    reported = [lp.logprob for o in outs for lp in o.logprobs]
    assert reported == pytest.approx(want, abs=1e-4)
    forced = Engine(model, max_slots=2).generate([prompt], SamplingParams(max_tokens=5, temperature=0.9, seed=3,
                                                                          logit_bias={7: 100.0}))[0][0]
    assert forced == [7] * 5
    with pytest.raises(ValueError, match="logit_bias token ids"):
        engine.submit(prompt, SamplingParams(logit_bias={53: 1.0}), outs.append)
    with pytest.raises(ValueError, match="logit_bias values"):
        engine.submit(prompt, SamplingParams(logit_bias={5: -101.0}), outs.append)

"""The batched scorer against transformers' Llama on the same weights; batch size and padding change nothing."""

import math

import pytest
import torch

import evalkit
from kiln.eval.choice import evaluate_choices
from kiln.eval.scoring import Scorer
from kiln.formats.hf import hf_state_dict, to_hf_config

transformers = pytest.importorskip("transformers")

PAIRS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
         ("Question: What is the capital of France?\nAnswer: ", "Lyon"),     # trailing space moves over
         ("The quick brown fox", " jumps over the lazy dog."),
         ("def add(a, b):\n", "    return a + b\n"),
         ("x", " A"), ("x", " B"), ("x", " C"), ("", "Alice had 3 apples")]


def hf_llama(model):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(model.cfg), attn_implementation="eager"))
    hf.load_state_dict(hf_state_dict(model), strict=False)
    return hf.eval()


def reference(hf, ctx_ids, cont_ids):
    """Log-probability of the continuation from one unpadded forward of transformers' Llama."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits.float()[0], dim=-1)
    n = len(ctx_ids)
    lps = [logp[n - 1 + i, t].item() for i, t in enumerate(cont_ids)]
    greedy = all(logp[n - 1 + i].argmax().item() == t for i, t in enumerate(cont_ids))
    return sum(lps), greedy


def test_scores_match_transformers_llama_at_any_batch_size():
    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size)
    hf = hf_llama(model)
    by_batch = {bs: Scorer(model, tok, batch_size=bs).loglikelihood(PAIRS) for bs in (1, 3, 32)}
    for i, (c, x) in enumerate(PAIRS):
        ctx, cont = Scorer(model, tok).encode_pair(c, x)
        ref_lp, ref_greedy = reference(hf, ctx, cont)
        for bs, scored in by_batch.items():
            assert scored[i].logprob == pytest.approx(ref_lp, abs=1e-4), (i, bs)
            assert scored[i].greedy == ref_greedy and scored[i].n_tokens == len(cont)
    # Between batch sizes the same rows go through the same kernels but padded to other lengths.
    for bs in (3, 32):
        for a, b in zip(by_batch[1], by_batch[bs]):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.greedy == b.greedy


def test_pair_encoding_moves_trailing_space_to_the_continuation():
    tok = evalkit.tokenizer()
    s = Scorer(evalkit.model(tok.vocab_size), tok)
    assert s.encode_pair("Answer: ", "Paris") == s.encode_pair("Answer:", " Paris")
    ctx, cont = s.encode_pair("Answer:", " Paris")
    assert ctx[0] == tok.bos_id and tok.decode(ctx[1:] + cont) == "Answer: Paris"


def test_choice_accuracy_identical_at_batch_1_and_32():
    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size, max_seq_len=256)
    items = [{"question": f"Which number comes after {i}?", "choices": [str(i + d) for d in (1, 2, 3, 5)],
              "answer": i % 4, "subject": "arithmetic"} for i in range(8)]
    for fmt, k in (("letter", 2), ("cloze", 1)):
        one = evaluate_choices(Scorer(model, tok, batch_size=1), items, fmt, k)
        many = evaluate_choices(Scorer(model, tok, batch_size=32), items, fmt, k)
        assert [p["pred"] for p in one.per_item] == [p["pred"] for p in many.per_item]
        assert [p["pred_norm"] for p in one.per_item] == [p["pred_norm"] for p in many.per_item]
        assert (one.acc, one.acc_norm) == (many.acc, many.acc_norm)
        for a, b in zip(one.per_item, many.per_item):
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)


def test_rolling_windows_score_every_token_once_with_bounded_context():
    tok = evalkit.tokenizer()
    s = Scorer(evalkit.model(tok.vocab_size, max_seq_len=16), tok)
    ids = list(range(1, 60))
    for stride in (16, 5, 1):
        windows = s.rolling_windows(ids, stride)
        scored = [t for _, cont in windows for t in cont]
        assert scored == ids[1:]
        for ctx, cont in windows:
            assert len(ctx) + len(cont) <= 17 and ctx     # a full window of inputs at most, never empty
        assert all(len(ctx) + len(cont) == 17 for ctx, cont in windows[1:-1])


def test_rolling_loglikelihood_equals_one_forward_when_the_text_fits():
    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size, max_seq_len=96)
    hf = hf_llama(model)
    text = "The quick brown fox jumps over the lazy dog."
    ids = [tok.bos_id] + tok.encode(text)
    ref, _ = reference(hf, ids[:1], ids[1:])
    for stride in (None, 7):
        got = Scorer(model, tok, batch_size=4).loglikelihood_rolling([text], stride)[0]
        assert got.n_tokens == len(ids) - 1
        assert got.logprob == pytest.approx(ref, abs=1e-4)


def test_sliding_window_gives_each_token_up_to_window_minus_stride_context():
    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size, max_seq_len=12)
    hf = hf_llama(model)
    text = "The quick brown fox jumps over the lazy dog. Alice had 3 apples."
    ids = [tok.bos_id] + tok.encode(text)
    W, S = 12, 4
    # Reference: one unpadded forward per window, whose inputs are the W ids ending just before its last target.
    expected, a = 0.0, 1
    while a < len(ids):
        b = min(len(ids), a + (W if a == 1 else S))
        lo = max(0, b - 1 - W)
        lp, _ = reference(hf, ids[lo:a], ids[a:b])
        expected += lp
        a = b
    got = Scorer(model, tok).loglikelihood_rolling([text], S)[0]
    assert got.logprob == pytest.approx(expected, abs=1e-4) and got.n_tokens == len(ids) - 1
    assert math.isfinite(got.logprob)


def test_generate_many_equals_one_prompt_at_a_time_greedy():
    """Batched generation through the engine gives each prompt what decoding it alone gives, whatever the batch."""
    from kiln.infer.generate import generate

    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size)
    prompts = ["The quick", "def add(a", "Question: What", "A. one", "Alice had"]
    alone = [tok.decode(generate(model, Scorer(model, tok).prompt_ids(p), 10, temperature=0, stop_ids=tok.stop_ids))
             for p in prompts]
    for bs in (1, 2, 8):
        assert [o[0] for o in Scorer(model, tok, batch_size=bs).generate_many(prompts, 10)] == alone
    cut = Scorer(model, tok).generate_many(prompts, 10, stop=[" "])
    assert [o[0] for o in cut] == [a.split(" ")[0] for a in alone]


def test_generate_many_samples_are_seeded_per_prompt():
    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size)
    prompts = ["The quick", "def add(a", "Alice had"]
    a = Scorer(model, tok, batch_size=4).generate_many(prompts, 8, temperature=1.0, n=3, seed=5)
    b = Scorer(model, tok, batch_size=2).generate_many(prompts[1:], 8, temperature=1.0, n=3, seed=6)
    assert a[1:] == b and len({*a[0]}) > 1   # prompt p draws with seed + p, whoever shares its batch


def test_chat_scoring_conditions_on_the_rendered_user_turn():
    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size)
    s = Scorer(model, tok, chat=True)
    ctx = "Question: What is the capital of France?\nAnswer:"
    ids = tok.encode_chat([{"role": "user", "content": ctx}], add_generation_prompt=True)
    assert s.encode_pair(ctx, " Paris") == (ids, tok.encode(" Paris"))
    got = s.loglikelihood([(ctx, " Paris")])[0]
    cont = tok.encode(" Paris")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + cont]))[0].float(), -1)
    assert got.logprob == pytest.approx(sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(cont)), abs=1e-4)


def test_continuations_sharing_a_context_score_as_if_alone():
    """Cloze answers share their context in one row (a tree mask): each equals transformers on the pair
    alone, at any batch size, also when the tails overflow the window and the context is repeated."""
    from kiln.eval.scoring import plan_rows

    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size, max_seq_len=24)
    hf = hf_llama(model)
    ctx = "Question: What is the capital of France?\nAnswer:"
    conts = [" Paris", " the quick brown fox", " Lyon, a city", " def add(a, b)", " three apples"]
    pairs = [(ctx, c) for c in conts] + [("The quick brown fox", " jumps over the lazy dog."),
                                         ("The quick brown fox", " A")]
    s = Scorer(model, tok)
    enc = s.encode_pairs(pairs)
    rows, _ = plan_rows(enc, 24)
    assert any(r.branched for r in rows) and len(rows) > len({r.ctx for r in rows})   # shared, and split at the window
    for bs in (1, 2, 32):
        got = Scorer(model, tok, batch_size=bs).loglikelihood(pairs)
        for (c, x), g in zip(enc, got):
            ref_lp, ref_greedy = reference(hf, c, x)
            assert g.logprob == pytest.approx(ref_lp, abs=1e-4) and g.greedy == ref_greedy and g.n_tokens == len(x)


def test_an_empty_context_is_refused():
    tok = evalkit.tokenizer()
    with pytest.raises(ValueError, match="empty context"):
        Scorer(evalkit.model(tok.vocab_size), tok).loglikelihood_tokens([([], [5, 6])])

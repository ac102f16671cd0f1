"""lm-evaluation-harness's own OpenAI-completions client (`local-completions`) scores log-likelihoods through
`kiln serve` (echo + prompt log-probabilities), equal to the model's own."""

import pytest
import torch

from servekit import Server, make_run

pytest.importorskip("tenacity")     # lm-eval's API models need it (lm-eval[api])
openai_completions = pytest.importorskip("lm_eval.models.openai_completions")
Instance = pytest.importorskip("lm_eval.api.instance").Instance

PAIRS = [("The capital of France is", " Paris."), ("Hello, how", " are you"), ("def add(a, b):", "\n    return a + b")]


def test_lm_eval_loglikelihood_through_the_server(tmp_path):
    run = make_run(tmp_path, max_seq_len=128)
    with Server(run, max_batch=4) as srv:
        lm = openai_completions.LocalCompletionsAPI(
            base_url=srv.url + "/completions", model="run", tokenizer=str(run / "tokenizer"),
            tokenizer_backend="huggingface", max_length=128, num_concurrent=2, max_retries=1)
        got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)])
        tok, model = srv.served.tokenizer, srv.engine.model
        for (ctx, cont), (logprob, greedy) in zip(PAIRS, got):
            # lm-eval tokenizes with transformers' tokenizer from the run's folder: no BOS (add_bos_token false).
            c, w = tok.encode(ctx), tok.encode(ctx + cont)
            with torch.no_grad():
                lp = model(torch.tensor([w]))[0].float().log_softmax(-1)
            assert logprob == pytest.approx(sum(lp[i - 1, w[i]].item() for i in range(len(c), len(w))), abs=1e-3)
            assert greedy == all(lp[i - 1].argmax().item() == w[i] for i in range(len(c), len(w)))

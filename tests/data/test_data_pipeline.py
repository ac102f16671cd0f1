"""The full default pipeline on prose and code: reasons, examples, PII counts, near-dedup, resume after a kill."""

import json
import os
import signal
import sys
import time

import pytest

from kiln.config import ClassifierConfig, Config, ConfigError, DataConfig
from kiln.data import run_data
from kiln.data import executors
from kiln.data import run as data_run
from test_data_filters import GOOD, PARAGRAPHS
from test_data_run import rows, untimed


OTHER = (
    "The library opened in a former railway warehouse after a long campaign by the residents. Its reading room "
    "is lit by the original roof windows, and the shelves hold more than forty thousand books.\n\n"
    "Children come after school to do their homework, and on Saturdays volunteers teach older people how to use "
    "computers. The staff also run a small archive of photographs, letters and maps of the region.\n\n"
    "Every spring the library hosts a book fair in the courtyard, where local writers read from their work and "
    "publishers from the city sell new titles at a discount.")


def jsonl(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


def prose_corpus(d):
    d.mkdir()
    near = GOOD.replace("busy square", "busy market square").replace("1620", "1621")
    docs = [GOOD, near,
            "Le petit village se trouve au bord de la rivière, et ses habitants vivent de la pêche. " * 5,
            "Buy the best shoes at the lowest price in the whole town today.\n" * 40,
            OTHER + "\n\nContact the author at someone@example.com for details about the archive."]
    (d / "a.jsonl").write_text(jsonl(docs))
    (d / "b.jsonl").write_text(jsonl([GOOD]))   # exact duplicate in another shard
    return d


def cfg_for(tmp_path, sources, **data):
    data.setdefault("workers", 1)
    return Config(run_dir=str(tmp_path / "run"), data=DataConfig(sources=[str(s) for s in sources], **data))


def test_default_pipeline_on_prose(tmp_path):
    src = prose_corpus(tmp_path / "in")
    r = run_data(cfg_for(tmp_path, [src], val_fraction=0.0, test_fraction=0.0))
    assert r["records_in"] == 6 == r["kept"] + sum(r["dropped"].values()) + r["quarantined"]
    steps = {s["step"]: s for s in r["steps"]}
    assert steps["language"]["dropped"] == {"language_fr": 1}
    assert steps["gopher_repetition"]["dropped"] == {"dup_line_frac": 1}
    assert steps["exact_dedup"]["dropped"] == {"duplicate": 1}
    assert steps["near_dedup"]["dropped"] == {"near_duplicate": 1}
    assert r["pii"] == {"email": 1}
    assert r["kept"] == 2
    texts = [x["text"] for x in rows(tmp_path / "run", "train")]
    assert texts[0] == GOOD and "<EMAIL>" in texts[1]
    ex = r["examples"]["language/language_fr"][0]
    assert ex["path"] == "a.jsonl" and ex["line"] == 3 and ex["text"].startswith("Le petit")
    assert steps["language"]["measured"]["docs_in"] == 6 and steps["language"]["measured"]["mb_per_s"] > 0


def test_code_sources_skip_prose_rules(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "m.py").write_text("def f(x):\n    return x + 1\n")
    (d / "notes.txt").write_text("def g(y):\n    return y * 2\n")
    r = run_data(cfg_for(tmp_path, [d]))
    assert r["kept"] == 1 == sum(r["dropped"].values())   # .py is code, .txt is prose: prose rules drop it
    assert [json.loads(x["meta"])["path"] for s in ("train", "val", "test") for x in rows(tmp_path / "run", s)] \
        == ["m.py"]
    r = run_data(cfg_for(tmp_path, [d], code_sources=[str(d)]))
    assert r["kept"] == 2
    with pytest.raises(ConfigError, match=r"data.code_sources\[0\]"):
        run_data(cfg_for(tmp_path, [d], code_sources=["elsewhere"]))


def test_unknown_step_is_rejected():
    with pytest.raises(ConfigError, match=r"data.steps\[1\]='gopher'"):
        DataConfig(steps=["normalize", "gopher"]).validate()


def test_quality_classifier_trains_and_filters(tmp_path):
    pytest.importorskip("fasttext")
    (tmp_path / "pos.jsonl").write_text(jsonl(PARAGRAPHS * 20))
    spam = ["Click here to win a free prize now, best casino deals and cheap pills online today."] * 80
    (tmp_path / "neg.jsonl").write_text(jsonl(spam))
    (tmp_path / "in.jsonl").write_text(jsonl([GOOD, " ".join(spam[:6])]))
    q = ClassifierConfig(enabled=True, positive=[str(tmp_path / "pos.jsonl")], negative=[str(tmp_path / "neg.jsonl")])
    r = run_data(cfg_for(tmp_path, [tmp_path / "in.jsonl"], quality_classifier=q,
                         steps=["normalize", "length_filter", "quality_classifier"]))
    assert r["kept"] == 1 and r["dropped"]["low_quality"] == 1
    assert (tmp_path / "run" / "data" / "quality.bin").is_file()


def test_finished_tasks_are_reused(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}.jsonl").write_text(jsonl([f"{p} Number {i}." for p in PARAGRAPHS]))
    cfg = cfg_for(tmp_path, [src])
    whole = untimed(run_data(cfg))
    work = cfg.run_path / "data" / "_work" / data_run.fingerprint(cfg.data)
    calls = []
    real = executors.run_task

    def failing(item, spec):
        calls.append(item[0])
        if item[0] == 3:
            raise KeyboardInterrupt   # a crash in the middle of the run
        return real(item, spec)

    monkeypatch.setattr(executors, "run_task", failing)
    with pytest.raises(KeyboardInterrupt):
        run_data(cfg)
    assert sorted(p.name for p in work.glob("*.json")) == [f"task-00000{i}.json" for i in range(3)]
    calls.clear()
    monkeypatch.setattr(executors, "run_task", lambda item, spec: (calls.append(item[0]), real(item, spec))[1])
    assert untimed(run_data(cfg)) == whole
    assert calls == list(range(6))   # asked for all, but the first three came from their markers
    assert not (cfg.run_path / "data" / "_work").exists()


@pytest.mark.slow
def test_kill_and_restart_gives_the_same_output(tmp_path, spawn):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(150):
        (src / f"f{i:03d}.jsonl").write_text(jsonl([f"{p} Part {i}, section {j}." for j in range(8)
                                                    for p in PARAGRAPHS]))
    ref = cfg_for(tmp_path / "ref", [src])
    want = untimed(run_data(ref))
    cfg = cfg_for(tmp_path / "killed", [src])
    script = (f"from kiln.config import Config, DataConfig; from kiln.data import run_data; "
              f"run_data(Config(run_dir={str(cfg.run_path)!r}, data=DataConfig(sources=[{str(src)!r}], workers=1)))")
    proc = spawn([sys.executable, "-c", script], timeout=120)
    work = cfg.run_path / "data" / "_work"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(work.glob("*/task-*.json"))) < 20:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("*/task-*.json")))
    assert 20 <= done < 150
    got = untimed(run_data(cfg))
    for r in (want, got):
        for key in ("sources", "quarantine"):
            r.pop(key)
    assert got == want
    for split in ("train", "val", "test"):
        a = sorted((ref.run_path / "data" / split).glob("*.parquet"))
        b = sorted((cfg.run_path / "data" / split).glob("*.parquet"))
        assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]

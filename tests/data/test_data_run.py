"""run_data end to end: accounting, outputs, reruns, determinism across worker counts."""

import gzip
import json
import random

import pyarrow.parquet as pq
import pytest
import zstandard

from kiln.config import Config, ConfigError, DataConfig, NearDedupConfig
from kiln.data import run_data
from kiln.config.rundir import RunDir

TIMING_KEYS = ("elapsed_s", "throughput_mb_s", "docs_per_s", "workers")


def untimed(report):
    """The report without wall-clock figures (which differ run to run)."""
    out = {k: v for k, v in report.items() if k not in TIMING_KEYS}
    out["steps"] = [{k: v for k, v in row.items() if k != "measured"} for row in report["steps"]]
    return out


BASIC_STEPS = ["fix_unicode", "normalize", "length_filter"]
"""The steps these tests are about: accounting, outputs and reruns (filters are tested in test_data_filters)."""


def config(tmp_path, sources, **data):
    """A config running only BASIC_STEPS + exact dedup unless `steps` / `near_dedup` are given."""
    data.setdefault("workers", 1)
    data.setdefault("steps", BASIC_STEPS)
    data.setdefault("near_dedup", NearDedupConfig(enabled=False))
    return Config(run_dir=str(tmp_path / "run"), data=DataConfig(sources=[str(s) for s in sources], **data))


def jsonl(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def rows(run_root, split):
    files = RunDir(run_root).split_files(split)
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def write_mixed_corpus(d):
    """Good and bad files of every kind; returns the expected drop and quarantine counts."""
    d.mkdir()
    (d / "good1.txt").write_text("hello world one\n")
    (d / "good2.md").write_text("# two\n\n\n\n\n\nsecond doc\n")
    (d / "dup.txt").write_bytes(b"hello world one  \r\n")              # equal to good1 once normalised
    (d / "empty.txt").write_bytes(b"")                                # read: empty
    (d / "blank.txt").write_text("  \n\n\t\n")                        # length_filter: empty
    (d / "short.txt").write_text("ab")                                # too_short (min_chars=5)
    (d / "long.txt").write_text("x" * 200)                            # too_long (max_doc_chars=100)
    (d / "latin1.txt").write_bytes(b"caf\xe9 au lait \xff\xfe\n")     # kept, decode_replaced warning
    (d / "binary.txt").write_bytes(b"GIF89a\n\x00\x01\x02")           # quarantined, line 2
    (d / "link.txt").symlink_to(d / "missing-target.txt")            # quarantined, unreadable
    (d / "lines.jsonl").write_bytes(b"\n".join([
        b'{"text": "jsonl good one"}', b'{"text": "jsonl good two"}',
        b'{"text": "bad \xff utf8"}', b'{"text": "no close', b'{"body": "wrong key"}', b'{"text": null}',
        b"", b'{"text": "hello world one"}']) + b"\n")               # quarantined lines 3-6, line 7 empty, dup
    gz = gzip.compress(jsonl([f"gz doc {i} " + "y" * 40 for i in range(2000)]))
    (d / "trunc.jsonl.gz").write_bytes(gz[: len(gz) // 2])            # quarantined from the break on
    rng = random.Random(0)
    zst = zstandard.ZstdCompressor().compress(jsonl([rng.randbytes(20).hex() for _ in range(20000)]))
    (d / "trunc.jsonl.zst").write_bytes(zst[: len(zst) // 2])         # quarantined from the break on
    import pyarrow as pa
    pq.write_table(pa.table({"text": ["parquet row one", None, "parquet row three"]}), d / "table.parquet")
    dropped = {"empty": 3, "too_short": 1, "too_long": 1, "duplicate": 2}
    quarantined = {"binary.txt": [2], "link.txt": [None], "lines.jsonl": [3, 4, 5, 6],
                   "trunc.jsonl.gz": "one", "trunc.jsonl.zst": "one", "table.parquet": [2]}
    return dropped, quarantined


def test_every_record_is_accounted_for(tmp_path):
    dropped, quarantined = write_mixed_corpus(tmp_path / "in")
    cfg = config(tmp_path, [tmp_path / "in"], min_chars=5, max_doc_chars=100, val_fraction=0.2, test_fraction=0.2)
    report = run_data(cfg)
    on_disk = json.loads((cfg.run_path / "data" / "report.json").read_text())
    assert on_disk == report

    r = report
    assert r["records_in"] == r["kept"] + sum(r["dropped"].values()) + r["quarantined"]
    assert r["dropped"] == dropped
    assert r["quarantined"] == 9 == len(r["quarantine"])
    by_file = {}
    for q in r["quarantine"]:
        by_file.setdefault(q["file"].rsplit("/", 1)[-1], []).append(q["line"])
        assert q["file"].startswith(str(tmp_path / "in")) and q["reason"]
    for name, lines in quarantined.items():
        assert by_file[name] == lines if lines != "one" else len(by_file[name]) == 1 and by_file[name][0] > 10
    assert r["warnings"]["decode_replaced"]["count"] == 1
    assert r["sources"][str(tmp_path / "in")]["files"] == 14

    kept = {s: rows(cfg.run_path, s) for s in ("train", "val", "test")}
    assert sum(len(v) for v in kept.values()) == r["kept"] > 1000
    for s, v in kept.items():
        assert r["splits"][s]["docs"] == len(v)
        assert r["splits"][s]["bytes"] == sum(len(x["text"].encode()) for x in v)
    texts = {x["text"] for v in kept.values() for x in v}
    assert {"hello world one", "# two\n\n\nsecond doc", "parquet row one", "jsonl good two"} <= texts
    assert any("\ufffd" in t for t in texts)


def test_steps_chain_in_to_out(tmp_path):
    write_mixed_corpus(tmp_path / "in")
    r = run_data(config(tmp_path, [tmp_path / "in"], min_chars=5, max_doc_chars=100))
    steps = {s["step"]: s for s in r["steps"]}
    assert list(steps) == ["read", *BASIC_STEPS, "exact_dedup", "near_dedup", "split"]
    assert not steps["near_dedup"]["enabled"] and steps["near_dedup"]["in"] == steps["near_dedup"]["out"]
    assert steps["read"]["in"] == r["records_in"]
    for a, b in zip(r["steps"], r["steps"][1:]):
        assert b["in"] == a["out"]
    assert sum(steps["split"]["out"].values()) == r["kept"]
    assert steps["exact_dedup"]["dropped"] == {"duplicate": 2}
    assert steps["length_filter"]["dropped"] == {"empty": 1, "too_long": 1, "too_short": 1}


def test_output_schema_and_meta(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(jsonl(["alpha doc", "beta doc"]))
    cfg = config(tmp_path, [tmp_path / "x.jsonl"], val_fraction=0.0, test_fraction=0.0)
    run_data(cfg)
    [shard] = RunDir(cfg.run_path).split_files("train")
    table = pq.read_table(shard)
    assert table.schema.names == ["id", "text", "source", "meta"]
    assert pq.ParquetFile(shard).metadata.row_group(0).column(1).compression == "ZSTD"
    first = table.to_pylist()[0]
    assert first["source"] == str(tmp_path / "x.jsonl") and len(first["id"]) == 16
    assert json.loads(first["meta"]) == {"path": "x.jsonl", "line": 1}


def test_empty_splits_have_a_folder_and_no_shards(tmp_path):
    (tmp_path / "a.txt").write_text("only document")
    cfg = config(tmp_path, [tmp_path / "a.txt"], val_fraction=0.0, test_fraction=0.0)
    r = run_data(cfg)
    for split in ("val", "test"):
        assert (cfg.run_path / "data" / split).is_dir() and not RunDir(cfg.run_path).split_files(split)
        assert r["splits"][split] == {"docs": 0, "bytes": 0, "shards": 0}


def test_shards_hold_at_most_shard_docs(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(jsonl([f"document {i}" for i in range(25)]))
    cfg = config(tmp_path, [tmp_path / "x.jsonl"], shard_docs=10, val_fraction=0.0, test_fraction=0.0)
    run_data(cfg)
    files = RunDir(cfg.run_path).split_files("train")
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(f).num_rows for f in files] == [10, 10, 5]
    assert [r["text"] for r in rows(cfg.run_path, "train")] == [f"document {i}" for i in range(25)]


def test_split_by_id_is_stable_whatever_else_is_in_the_corpus(tmp_path):
    docs = [f"doc {i}: " + "z" * (i % 7) for i in range(1500)]
    (tmp_path / "a.jsonl").write_bytes(jsonl(docs[:1000]))
    (tmp_path / "b.jsonl").write_bytes(jsonl(list(reversed(docs[500:]))))
    where = []
    for name in ("a", "b"):
        cfg = config(tmp_path / name, [tmp_path / f"{name}.jsonl"], val_fraction=0.1, test_fraction=0.1)
        run_data(cfg)
        where.append({r["text"]: s for s in ("train", "val", "test") for r in rows(cfg.run_path, s)})
    common = set(where[0]) & set(where[1])
    assert len(common) == 500 and all(where[0][t] == where[1][t] for t in common)
    counts = {s: list(where[0].values()).count(s) for s in ("train", "val", "test")}
    assert abs(counts["val"] - 100) < 40 and abs(counts["test"] - 100) < 40


def test_dedup_off_keeps_duplicates(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(jsonl(["same", "same", "same\r\n"]))
    r = run_data(config(tmp_path, [tmp_path / "x.jsonl"], dedup=False))
    assert r["kept"] == 3 and r["dropped"]["duplicate"] == 0
    r = run_data(config(tmp_path, [tmp_path / "x.jsonl"], dedup=True))
    assert r["kept"] == 1 and r["dropped"]["duplicate"] == 2


def test_normalize_off_keeps_text_as_read(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(jsonl(["a  \r\nb\n\n\n\n\nc"]))
    cfg = config(tmp_path, [tmp_path / "x.jsonl"], normalize=False, val_fraction=0.0, test_fraction=0.0)
    r = run_data(cfg)
    assert [x["text"] for x in rows(cfg.run_path, "train")] == ["a  \r\nb\n\n\n\n\nc"]
    assert r["steps"][2] == {"step": "normalize", "enabled": False, "in": 1, "changed": 0, "out": 1, "dropped": {}}


def test_max_docs_caps_records_in_order(tmp_path):
    for name in "abc":
        (tmp_path / f"{name}.jsonl").write_bytes(jsonl([f"{name} line {i}" for i in range(10)]))
    cfg = config(tmp_path, [tmp_path], max_docs=15, val_fraction=0.0, test_fraction=0.0)
    r = run_data(cfg)
    assert r["records_in"] == 15 and r["files"] == 2 and r["max_docs_reached"]
    assert [x["text"] for x in rows(cfg.run_path, "train")] == [f"a line {i}" for i in range(10)] + \
        [f"b line {i}" for i in range(5)]


def test_python_stdlib_default_source(tmp_path):
    cfg = Config(run_dir=str(tmp_path / "run"), data=DataConfig(max_docs=30, workers=1))
    r = run_data(cfg)
    assert r["records_in"] == 30 and list(r["sources"]) == ["python-stdlib"]
    metas = [json.loads(x["meta"]) for s in ("train", "val", "test") for x in rows(cfg.run_path, s)]
    assert metas and all(m["path"].endswith(".py") and not m["path"].startswith("/") for m in metas)


def test_rerun_overwrites_cleanly(tmp_path):
    (tmp_path / "big.jsonl").write_bytes(jsonl([f"document {i}" for i in range(20)]))
    (tmp_path / "small.jsonl").write_bytes(jsonl(["just one document"]))
    cfg = config(tmp_path, [tmp_path / "big.jsonl"], shard_docs=2, val_fraction=0.0, test_fraction=0.0)
    run_data(cfg)
    data = cfg.run_path / "data"
    assert len(RunDir(cfg.run_path).split_files("train")) == 10
    (data / "_SUCCESS").write_text("")                 # as the pipeline would have left it
    (data / "val" / "part-00042.parquet").write_text("stale")
    cfg.data.sources = [str(tmp_path / "small.jsonl")]
    r = run_data(cfg)
    assert [f.name for f in RunDir(cfg.run_path).split_files("train")] == ["part-00000.parquet"]
    assert not RunDir(cfg.run_path).split_files("val") and not (data / "_SUCCESS").exists()
    assert r["records_in"] == 1 and json.loads((data / "report.json").read_text())["records_in"] == 1


def test_bad_source_fails_before_touching_previous_output(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(jsonl(["a document"]))
    cfg = config(tmp_path, [tmp_path / "x.jsonl"])
    run_data(cfg)
    cfg.data.sources = [str(tmp_path / "typo.jsonl")]
    with pytest.raises(ConfigError, match="typo.jsonl"):
        run_data(cfg)
    assert (cfg.run_path / "data" / "report.json").exists()


def test_workers_1_and_2_give_byte_identical_outputs(tmp_path):
    write_mixed_corpus(tmp_path / "in")
    for i in range(30):
        (tmp_path / "in" / f"many{i:02d}.jsonl").write_bytes(jsonl([f"file {i} doc {j}" for j in range(i)]))
    reports, outputs = [], []
    for workers in (1, 2):
        cfg = config(tmp_path / f"w{workers}", [tmp_path / "in"], workers=workers, shard_docs=200,
                     min_chars=5, max_doc_chars=100, val_fraction=0.2, test_fraction=0.1)
        r = run_data(cfg)
        assert r["workers"] == workers
        reports.append(untimed(r))
        files = sorted((cfg.run_path / "data").glob("*/*.parquet"))
        outputs.append({f.relative_to(cfg.run_path).as_posix(): f.read_bytes() for f in files})
    assert reports[0] == reports[1]
    assert len(outputs[0]) > 3 and outputs[0] == outputs[1]


@pytest.mark.parametrize("bad", [{"max_docs": -1}, {"min_chars": 10, "max_doc_chars": 5}, {"text_key": ""}])
def test_unusable_data_config_is_rejected(tmp_path, bad):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ConfigError, match="data."):
        run_data(config(tmp_path, [tmp_path / "a.txt"], **bad))


def test_resume_fingerprint_follows_the_benchmark_files(tmp_path):
    from kiln.config import DecontaminateConfig
    from kiln.data.run import fingerprint
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"q": "one two three four five six seven eight nine ten eleven twelve thirteen"}) + "\n")
    d = DataConfig(decontaminate=DecontaminateConfig(benchmarks=[str(bench)]))
    before = fingerprint(d)
    assert fingerprint(d) == before
    bench.write_text(bench.read_text() + json.dumps({"q": "a different question entirely, long enough to count"}) + "\n")
    assert fingerprint(d) != before   # a resumed run must not reuse tasks checked against the old file
    off = DataConfig(decontaminate=DecontaminateConfig(enabled=False, benchmarks=[str(bench)]))
    assert fingerprint(off) == fingerprint(off)


def test_report_counts_documents_changed_not_replacements():
    from kiln.data.readers import FileTask
    from kiln.data.report import Tally
    t = Tally()
    task = FileTask(path="p", rel="p", source="s")
    t.flags_from("pii:email,pii:email,pii:iban_code", task, None)
    t.flags_from("pii:iban_code", task, None)   # an extra Presidio type counts too
    t.flags_from("normalized", task, None)
    assert t.changed["pii"] == 2 and t.changed["normalize"] == 1
    assert t.flags["pii:email"] == 2


def test_kept_documents_trace_back_to_the_users_records(tmp_path):
    recs = [{"id": "r-1", "text": "alpha doc", "url": "http://a"}, {"id": 2, "text": "beta doc"},
            {"text": "gamma doc", "url": "http://c"}]
    (tmp_path / "x.json").write_text(json.dumps(recs, indent=2))
    cfg = config(tmp_path, [tmp_path / "x.json"], keep_fields=["url"], val_fraction=0.0, test_fraction=0.0)
    r = run_data(cfg)
    assert r["kept"] == 3 and r["quarantined"] == 0
    out = rows(cfg.run_path, "train")
    assert [x["text"] for x in out] == ["alpha doc", "beta doc", "gamma doc"]
    assert [json.loads(x["meta"]) for x in out] == [
        {"path": "x.json", "record": 1, "id": "r-1", "url": "http://a"},
        {"path": "x.json", "record": 2, "id": 2},
        {"path": "x.json", "record": 3, "url": "http://c"}]


@pytest.mark.parametrize("keep,match", [(["line"], "kiln writes this meta key"), (["text"], "is data.text_key"),
                                        (["url", "url"], "listed twice"), ([""], "name a field")])
def test_unusable_keep_fields_fail_at_load_naming_the_entry(keep, match):
    with pytest.raises(ConfigError, match=r"data.keep_fields\[\d\].*" + match):
        DataConfig(keep_fields=keep).validate()


def test_files_no_reader_takes_are_listed_in_the_report(tmp_path, capsys):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a document")
    for i in range(15):
        (d / "sub" / f"paper{i:02d}.pdf").write_bytes(b"%PDF-1.4")
    (d / "notes.docx").write_bytes(b"PK")
    (d / "README").write_text("read me")
    (d / "app.log.2024-01-03").write_text("a dated log: part of the name, not a file type")
    r = run_data(config(tmp_path, [d]))
    assert r["files"] == 1 and r["records_in"] == 1
    skipped = r["skipped_files"]
    assert skipped["count"] == 18 and list(skipped["by_reason"]) == [
        "unsupported extension .pdf", "no file extension", "unsupported extension .docx"]
    pdf = skipped["by_reason"]["unsupported extension .pdf"]
    assert pdf["count"] == 15 and pdf["examples"] == [f"{d}:sub/paper{i:02d}.pdf" for i in range(10)]   # capped
    assert skipped["by_reason"]["no file extension"] == {"count": 2,
                                                         "examples": [f"{d}:README", f"{d}:app.log.2024-01-03"]}
    assert "skipping 18 files" in capsys.readouterr().out

"""Readers and source resolution, on real files written to tmp_path (broken ones included)."""

import gzip
import json
import os
import random
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kiln.config import ConfigError
from kiln.data import readers
from kiln.data.readers import FileTask, read_file
from kiln.data.records import Doc, Drop, Quarantined
from kiln.data.sources import resolve_sources


def lines_jsonl(texts):
    return "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)).encode()


def read(path, text_key="text", limit=None, keep=()):
    return list(read_file(FileTask(str(path), path.name, "src"), text_key, limit, keep))


def texts(records):
    return [r.text for r in records if isinstance(r, Doc)]


# ---------------------------------------------------------------- formats


def test_text_and_markdown_are_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "b.md").write_text("# Title\n\nbody\n")
    [a] = read(tmp_path / "a.txt")
    [b] = read(tmp_path / "b.md")
    assert a.text == "line one\nline two\n" and a.meta == {"path": "a.txt"} and a.source == "src"
    assert b.text == "# Title\n\nbody\n" and not b.flags


@pytest.mark.parametrize("name,compress", [
    ("x.jsonl", lambda b: b),
    ("x.json", lambda b: b),
    ("x.jsonl.gz", gzip.compress),
    ("x.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_variants_are_one_document_per_line(tmp_path, name, compress):
    want = ["first", "second\nwith newline", "third é"]
    (tmp_path / name).write_bytes(compress(lines_jsonl(want)))
    records = read(tmp_path / name)
    assert texts(records) == want
    assert [r.meta["line"] for r in records] == [1, 2, 3]


def test_jsonl_custom_text_key_crlf_and_no_final_newline(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'{"body": "a"}\r\n{"body": "b"}')
    assert texts(read(tmp_path / "x.jsonl", text_key="body")) == ["a", "b"]


def test_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "x.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert texts(read(tmp_path / "x.jsonl")) == ["a", "b"]
    assert texts(read(tmp_path / "x.txt")) == ["hello"]


def test_zstd_with_concatenated_frames(tmp_path):
    c = zstandard.ZstdCompressor()
    (tmp_path / "x.jsonl.zst").write_bytes(c.compress(lines_jsonl(["a", "b"])) + c.compress(lines_jsonl(["c"])))
    assert texts(read(tmp_path / "x.jsonl.zst")) == ["a", "b", "c"]


def test_line_splitting_matches_bytes_split_at_any_chunking():
    # Reference: bytes.split. Lines spanning chunk borders, empty chunks, and a missing final newline.
    rng = random.Random(0)
    data = b"".join(rng.choice([b"a", b"bc", b"\n", b"xyz" * 50]) for _ in range(2000))
    cuts = sorted(rng.sample(range(len(data)), 200))
    chunks = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])] + [b""]
    want = data.split(b"\n")
    if want[-1] == b"":
        want.pop()
    assert list(readers._lines(chunks)) == want


def test_parquet_one_document_per_row(tmp_path):
    pq.write_table(pa.table({"text": ["r1", None, "r3"], "other": [1, 2, 3]}), tmp_path / "x.parquet")
    records = read(tmp_path / "x.parquet")
    assert texts(records) == ["r1", "r3"]
    assert [r.meta["row"] for r in records if isinstance(r, Doc)] == [1, 3]
    [null] = [r for r in records if isinstance(r, Quarantined)]
    assert null.line == 2 and "null" in null.reason


def test_parquet_without_text_column_is_quarantined(tmp_path):
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "x.parquet")
    [bad] = read(tmp_path / "x.parquet")
    assert isinstance(bad, Quarantined) and "content" in bad.reason and "text_key" in bad.reason


def test_limit_caps_records_per_file(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(lines_jsonl(list("abcdef")))
    assert texts(read(tmp_path / "x.jsonl", limit=4)) == list("abcd")


# ---------------------------------------------------------------- JSON arrays


def quarantined(records):
    return {r.line: r.reason for r in records if isinstance(r, Quarantined)}


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_json_array_is_one_document_per_record_at_any_chunking(tmp_path, monkeypatch, chunk):
    # Elements span chunk borders anywhere (inside strings, escapes, multi-byte characters, numbers).
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    want = [f"doc {i} " + "é" * i + ' "quoted" \\ ,]} \u263a' for i in range(30)]
    recs = [{"text": t, "n": 10 ** i, "nested": [{"a": [i]}]} for i, t in enumerate(want)]
    (tmp_path / "x.json").write_text(json.dumps(recs, indent=2, ensure_ascii=False))
    records = read(tmp_path / "x.json")
    assert texts(records) == want
    assert [r.meta for r in records[:2]] == [{"path": "x.json", "record": 1}, {"path": "x.json", "record": 2}]


def test_json_array_is_streamed_not_loaded_whole(tmp_path):
    import tracemalloc
    recs = [{"text": f"document {i} " + "x" * 200} for i in range(100_000)]   # ~22 MB
    (tmp_path / "x.json").write_text(json.dumps(recs))
    tracemalloc.start()
    try:
        n = sum(isinstance(r, Doc) for r in read_file(FileTask(str(tmp_path / "x.json"), "x.json", "src"), "text"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == len(recs) and peak < 8 << 20, peak   # a few chunks, not the file


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_bad_records_in_a_json_array_are_quarantined_with_record_and_line(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    lines = [b'\xef\xbb\xbf  [', b'{"text": "ok"},', b'7,', b'{"text": "bad \xff utf8"},', b'{"body": "no key"},',
             b'{"text": 42},', b'{"text": "\\ud800 lone surrogate"},', b'{"text": "x", "id": "\\udc00"},',
             b'{"text": "\\ud83d\\ude00 a real pair"}', b']', b'']
    (tmp_path / "x.json").write_bytes(b"\n".join(lines))
    records = read(tmp_path / "x.json")
    assert texts(records) == ["ok", "\U0001F600 a real pair"] and records[-1].meta["record"] == 8
    bad = quarantined(records)
    assert sorted(bad) == [3, 4, 5, 6, 7, 8]
    assert bad[3].startswith("record 2: ") and "object" in bad[3]
    assert bad[4] == "record 3: invalid UTF-8" and "no field 'text'" in bad[5] and "int" in bad[6]
    assert "surrogate" in bad[7] and "'id'" in bad[8] and bad[8].startswith("record 7: ")


@pytest.mark.parametrize("cut", ["inside a record", "after a record"])
def test_truncated_json_array_keeps_the_records_before_the_cut(tmp_path, cut):
    data = json.dumps([{"text": f"doc {i}"} for i in range(1000)], indent=1).encode()
    record = data.index(b'"doc 600"')
    at = record if cut == "inside a record" else data.index(b"}", record) + 1
    (tmp_path / "x.json").write_bytes(data[:at])
    records = read(tmp_path / "x.json")
    assert texts(records) == [f"doc {i}" for i in range(600 if cut == "inside a record" else 601)]
    [(line, reason)] = quarantined(records).items()
    assert "truncated" in reason and isinstance(records[-1], Quarantined)
    where = data.rindex(b"{", 0, at) if cut == "inside a record" else at   # the cut record, or the end
    assert line == data[:where].count(b"\n") + 1


def test_invalid_json_in_an_array_ends_the_file_in_one_quarantined_record(tmp_path):
    (tmp_path / "x.json").write_bytes(b'[{"text": "a"},\n{"text": oops},\n{"text": "c"}]')
    records = read(tmp_path / "x.json")
    assert texts(records) == ["a"]
    assert quarantined(records) == {2: "record 2: invalid JSON (Expecting value); the rest of the file is not read"}


def test_empty_json_array_has_no_records_and_data_after_it_is_quarantined(tmp_path):
    (tmp_path / "x.json").write_bytes(b" [ ]\n\n")
    assert read(tmp_path / "x.json") == []
    (tmp_path / "y.json").write_bytes(b'[{"text": "a"}]\n[{"text": "b"}]')
    records = read(tmp_path / "y.json")
    assert texts(records) == ["a"] and "after the closing ]" in quarantined(records)[2]


# ---------------------------------------------------------------- ids and kept fields


def test_record_id_and_keep_fields_go_into_meta_in_every_format(tmp_path):
    recs = [{"id": "u-1", "text": "a", "url": "http://a", "lang": "en"}, {"text": "b", "url": None},
            {"id": 7, "text": "c", "url": "http://c", "tags": ["x"]}]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "x.json").write_text(json.dumps(recs))
    pq.write_table(pa.table({"text": ["a", "b"], "id": ["u-1", None], "url": ["http://a", None]}),
                   tmp_path / "x.parquet")
    where = {"x.jsonl": "line", "x.json": "record", "x.parquet": "row"}
    for name, key in where.items():
        metas = [r.meta for r in read(tmp_path / name, keep=("url", "tags"))]
        assert metas[0] == {"path": name, key: 1, "id": "u-1", "url": "http://a"}
        assert metas[1] == {"path": name, key: 2}   # no id, a null url: no such keys
    assert [r.meta for r in read(tmp_path / "x.json", keep=("url", "tags"))][2] == \
        {"path": "x.json", "record": 3, "id": 7, "url": "http://c", "tags": ["x"]}
    assert read(tmp_path / "x.jsonl")[0].meta == {"path": "x.jsonl", "line": 1, "id": "u-1"}   # id always kept


def test_parquet_meta_column_that_json_cannot_hold_quarantines_the_file(tmp_path):
    import datetime
    pq.write_table(pa.table({"text": ["a"], "when": [datetime.datetime(2024, 1, 2)]}), tmp_path / "x.parquet")
    assert texts(read(tmp_path / "x.parquet")) == ["a"]   # not asked for: not read
    [bad] = read(tmp_path / "x.parquet", keep=("when",))
    assert isinstance(bad, Quarantined) and "'when' has type timestamp" in bad.reason and "keep_fields" in bad.reason


# ---------------------------------------------------------------- bad input


def test_truncated_gzip_keeps_lines_before_the_break(tmp_path):
    data = gzip.compress(lines_jsonl([f"doc {i} " + "x" * 50 for i in range(3000)]))
    (tmp_path / "x.jsonl.gz").write_bytes(data[: len(data) // 2])
    records = read(tmp_path / "x.jsonl.gz")
    good, bad = texts(records), records[-1]
    assert 100 < len(good) < 3000 and good[0].startswith("doc 0 ")
    assert isinstance(bad, Quarantined) and bad.line == len(records)   # the line after the last one read
    assert all(not isinstance(r, Quarantined) for r in records[:-2])


def test_truncated_zstd_is_quarantined(tmp_path):
    rng = random.Random(0)   # incompressible text: many blocks, so the lines before the cut survive
    data = zstandard.ZstdCompressor().compress(lines_jsonl([rng.randbytes(40).hex() for _ in range(20000)]))
    (tmp_path / "x.jsonl.zst").write_bytes(data[: len(data) // 2])
    records = read(tmp_path / "x.jsonl.zst")
    assert len(texts(records)) > 1000
    assert isinstance(records[-1], Quarantined) and "truncated" in records[-1].reason


def test_not_actually_gzip_is_quarantined_at_line_1(tmp_path):
    (tmp_path / "x.jsonl.gz").write_bytes(b'{"text": "plain, not gzip"}\n')
    [bad] = read(tmp_path / "x.jsonl.gz")
    assert isinstance(bad, Quarantined) and bad.line == 1


def test_bad_jsonl_lines_are_quarantined_with_their_line(tmp_path):
    lines = [b'{"text": "ok"}', b'{"text": "bad \xff\xfe utf8"}', b'{"text": "unclosed', b'{"body": "no key"}',
             b'{"text": 42}', b'["not", "an object"]', b'{"text": "\\ud800 lone surrogate"}', b"   ", b'{"text": "ok2"}']
    (tmp_path / "x.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    records = read(tmp_path / "x.jsonl")
    assert texts(records) == ["ok", "ok2"]
    bad = {r.line: r.reason for r in records if isinstance(r, Quarantined)}
    assert sorted(bad) == [2, 3, 4, 5, 6, 7]
    assert "UTF-8" in bad[2] and "JSON" in bad[3] and "no field 'text'" in bad[4] and "int" in bad[5]
    assert "object" in bad[6] and "surrogate" in bad[7]
    assert records[7] == Drop("read", "empty")


def test_invalid_utf8_text_file_is_kept_with_replacement_and_flagged(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"caf\xe9 latin-1 \xff\xfe\n")
    [doc] = read(tmp_path / "x.txt")
    assert isinstance(doc, Doc) and "\ufffd" in doc.text and doc.flags == ("decode_replaced",)


def test_binary_file_with_text_extension_is_quarantined(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"text\nmore\n\x00\x01\x02binary")
    [bad] = read(tmp_path / "x.txt")
    assert isinstance(bad, Quarantined) and bad.line == 3 and "NUL" in bad.reason


@pytest.mark.parametrize("name", ["x.txt", "x.jsonl", "x.jsonl.gz", "x.parquet"])
def test_empty_file_is_dropped_as_empty(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    assert read(tmp_path / name) == [Drop("read", "empty")]


def test_dangling_symlink_is_quarantined_as_unreadable(tmp_path):
    (tmp_path / "x.txt").symlink_to(tmp_path / "gone.txt")
    [bad] = read(tmp_path / "x.txt")
    assert isinstance(bad, Quarantined) and "unreadable" in bad.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_is_quarantined(tmp_path):
    (tmp_path / "x.txt").write_text("secret")
    (tmp_path / "x.txt").chmod(0)
    [bad] = read(tmp_path / "x.txt")
    assert isinstance(bad, Quarantined) and "unreadable" in bad.reason


# ---------------------------------------------------------------- sources


def make_tree(root):
    for rel in ["b/z.txt", "b/a.jsonl", "a.md", "c/d/e.jsonl.gz", "skip.csv", "c/readme"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def test_directory_source_is_recursive_sorted_and_skips_unsupported(tmp_path):
    make_tree(tmp_path)
    tasks = resolve_sources([str(tmp_path)]).tasks
    assert [t.rel for t in tasks] == ["a.md", "b/a.jsonl", "b/z.txt", "c/d/e.jsonl.gz"]
    assert all(t.source == str(tmp_path) for t in tasks)


def test_glob_source_is_sorted_with_paths_relative_to_its_fixed_prefix(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "a.jsonl").write_bytes(b"x")
    tasks = resolve_sources([f"{tmp_path}/**/*.jsonl"]).tasks
    assert [t.rel for t in tasks] == ["a.jsonl", "b/a.jsonl"]


def test_sources_keep_their_given_order(tmp_path):
    make_tree(tmp_path)
    tasks = resolve_sources([str(tmp_path / "b/z.txt"), str(tmp_path / "a.md")]).tasks
    assert [t.rel for t in tasks] == ["z.txt", "a.md"]


@pytest.mark.parametrize("source,expect", [
    ("nope.jsonl", "does not exist"),
    ("*.nothing", "matched nothing"),
    ("skip.csv", "unsupported extension"),
    ("c/d/nope/x.txt", "does not exist either"),
])
def test_source_matching_nothing_is_a_clear_error(tmp_path, monkeypatch, source, expect):
    make_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=expect) as e:
        resolve_sources(["a.md", source])
    assert "data.sources[1]" in str(e.value) and source in str(e.value)


def test_missing_file_error_lists_what_exists(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ConfigError, match="a.md, b, c, skip.csv"):
        resolve_sources([str(tmp_path / "a.txt")])


def test_directory_without_supported_files_is_an_error(tmp_path):
    (tmp_path / "only.csv").write_text("x")
    with pytest.raises(ConfigError, match="only.csv"):
        resolve_sources([str(tmp_path)])


def test_python_stdlib_finds_stdlib_files_not_site_packages():
    tasks = resolve_sources(["python-stdlib"]).tasks
    rels = [t.rel for t in tasks]
    assert len(rels) > 500 and rels == sorted(rels)
    assert {"os.py", "json/__init__.py"} <= set(rels)
    assert all(r.endswith(".py") and "site-packages" not in r and "dist-packages" not in r for r in rels)


def test_python_stdlib_skips_site_and_dist_packages(tmp_path, monkeypatch):
    for rel in ["os.py", "json/decoder.py", "site-packages/pkg/mod.py", "dist-packages/m.py", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert [t.rel for t in resolve_sources(["python-stdlib"]).tasks] == ["json/decoder.py", "os.py"]


def test_unsupported_files_of_directories_and_globs_are_returned_as_skipped(tmp_path):
    make_tree(tmp_path)
    assert [(s.rel, s.reason) for s in resolve_sources([str(tmp_path)]).skipped] == [
        ("c/readme", "no file extension"), ("skip.csv", "unsupported extension .csv")]
    glob_skips = resolve_sources([f"{tmp_path}/*"]).skipped
    assert [(s.source, s.rel) for s in glob_skips] == [(f"{tmp_path}/*", "skip.csv")]   # folders are no files
    assert resolve_sources(["python-stdlib"]).skipped == []   # a built-in source picks its own files

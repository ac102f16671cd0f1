"""Read one input file into records, whatever its format and however broken it is.

Formats, by file name:
    .txt .md .py                      one document per file
    .jsonl .json .jsonl.gz .jsonl.zst one document per line, text in field `text_key`
    .parquet                          one document per row, text in column `text_key`

Bad input never raises: it comes out as `Quarantined` (file, line, reason) or
`Drop("read", "empty")`, so the run goes on and the report counts it. Only
programming errors raise.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from kiln.data.records import Doc, Drop, Quarantined, Record

FORMATS = {
    ".txt": "text", ".md": "text", ".py": "text",
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl",
    ".parquet": "parquet",
}
CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024


class TruncatedStream(Exception):
    """A compressed stream that ends before its end-of-frame marker."""


@dataclass(frozen=True)
class FileTask:
    """One file to read: where it is, what to call it, which source it belongs to."""

    path: str
    """Path to open (and to name in quarantine entries)."""
    rel: str
    """Path relative to the source root: the `path` in each document's meta."""
    source: str
    kind: str = "prose"
    """`prose` or `code`: which per-document rules apply (see `sources.content_type`)."""


def format_of(name: str) -> str | None:
    """`text`, `jsonl`, `parquet`, or None for an unsupported file name."""
    lower = name.lower()
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    return None


def read_file(task: FileTask, text_key: str, limit: int | None = None) -> Iterator[Record]:
    """Records of one file in order, at most `limit` of them."""
    records = _read(task, text_key)
    return itertools.islice(records, limit) if limit is not None else records


def _read(task: FileTask, text_key: str) -> Iterator[Record]:
    try:
        size = os.stat(task.path).st_size
    except OSError as e:
        yield Quarantined(task.path, None, f"unreadable: {e.strerror or e}")
        return
    if size == 0:
        yield Drop("read", "empty")
        return
    fmt = format_of(task.path)
    if fmt == "text":
        yield _read_text(task)
    elif fmt == "jsonl":
        yield from _read_jsonl(task, text_key)
    else:
        assert fmt == "parquet", task.path
        yield from _read_parquet(task, text_key)


# ---------------------------------------------------------------- plain text


def _read_text(task: FileTask) -> Record:
    try:
        data = Path(task.path).read_bytes()
    except OSError as e:
        return Quarantined(task.path, None, f"unreadable: {e.strerror or e}")
    nul = data.find(b"\0")
    if nul >= 0:
        # NUL never occurs in text; this is a binary file with a text extension.
        return Quarantined(task.path, data.count(b"\n", 0, nul) + 1, "binary file: NUL byte")
    try:
        return Doc(data.decode("utf-8-sig"), task.source, {"path": task.rel})   # -sig: drop a byte-order mark
    except UnicodeDecodeError:
        # Keep the document (e.g. a latin-1 source file) with U+FFFD where bytes were bad; counted as a warning.
        text = data.decode("utf-8-sig", errors="replace")
        return Doc(text, task.source, {"path": task.rel}, ("decode_replaced",))


# ---------------------------------------------------------------- JSON lines


def _read_jsonl(task: FileTask, text_key: str) -> Iterator[Record]:
    lineno = 0
    try:
        for lineno, raw in enumerate(_lines(_chunks(task.path)), start=1):
            yield _parse_line(raw, task, lineno, text_key)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, TruncatedStream) as e:
        # Lines before the failure are kept; the rest of the file is one quarantined record.
        yield Quarantined(task.path, lineno + 1, f"unreadable from line {lineno + 1} on: {e}")


def _parse_line(raw: bytes, task: FileTask, lineno: int, text_key: str) -> Record:
    if not raw.strip():
        return Drop("read", "empty")
    try:
        # A byte-order mark (Windows editors write one) is encoding metadata, not text: drop it on line 1.
        obj = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        return Quarantined(task.path, lineno, f"invalid UTF-8 at byte {e.start}")
    except (ValueError, RecursionError) as e:
        return Quarantined(task.path, lineno, f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        return Quarantined(task.path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    if text_key not in obj:
        fields = ", ".join(list(obj)[:10]) or "none"
        return Quarantined(task.path, lineno, f"no field {text_key!r} (fields: {fields}); set data.text_key")
    text = obj[text_key]
    if not isinstance(text, str):
        return Quarantined(task.path, lineno, f"field {text_key!r} is {type(text).__name__}, not a string")
    if not _encodable(text):
        return Quarantined(task.path, lineno, f"field {text_key!r} holds a lone surrogate (\\ud800-\\udfff)")
    return Doc(text, task.source, {"path": task.rel, "line": lineno})


def _encodable(text: str) -> bool:
    # JSON "\ud800" escapes decode to lone surrogates, which UTF-8 (and so Parquet) cannot hold.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _chunks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly .gz / .zst) file; raises on a truncated or corrupt stream."""
    lower = path.lower()
    if lower.endswith(".zst"):
        yield from _zstd_chunks(path)
        return
    opener = gzip.open if lower.endswith(".gz") else open
    with opener(path, "rb") as f:   # gzip raises EOFError on truncation, BadGzipFile (OSError) on garbage
        # read1, not read: read(n) loops until n bytes, and a truncation error inside it loses
        # everything it had gathered; read1 hands back what one decompression step made.
        while chunk := f.read1(CHUNK_BYTES):
            yield chunk


def _zstd_chunks(path: str) -> Iterator[bytes]:
    # zstandard's stream_reader returns a clean EOF on a truncated file, so check each frame's end ourselves.
    dctx = zstandard.ZstdDecompressor()
    frame, fed = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            while chunk:
                fed = True
                yield frame.decompress(chunk)
                chunk = b""
                if frame.eof:   # concatenated frames (zstd CLI on a pipe) continue in unused_data
                    chunk, frame, fed = frame.unused_data, dctx.decompressobj(), False
    if fed and not frame.eof:
        raise TruncatedStream("zstd stream ends before its end-of-frame marker (truncated file)")


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream on b"\\n"; a last line without newline still counts."""
    pending: list[bytes] = []   # pieces of a line spanning chunks (joined once: no quadratic copying)
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        yield b"".join(pending) + parts[0]
        yield from parts[1:-1]
        pending = [parts[-1]]
    tail = b"".join(pending)
    if tail:
        yield tail


# ---------------------------------------------------------------- Parquet


def _read_parquet(task: FileTask, text_key: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(task.path)
        problem = _text_column_problem(pf.schema_arrow, text_key)
        if problem:
            yield Quarantined(task.path, None, problem)
            return
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    yield Quarantined(task.path, row, f"column {text_key!r} is null")
                else:
                    yield Doc(value, task.source, {"path": task.rel, "row": row})
    except (OSError, pa.ArrowException) as e:
        yield Quarantined(task.path, row + 1, f"unreadable Parquet from row {row + 1} on: {e}")


def _text_column_problem(schema, text_key: str) -> str | None:
    import pyarrow as pa

    if text_key not in schema.names:
        return f"no column {text_key!r} (columns: {', '.join(schema.names[:10])}); set data.text_key"
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        return f"column {text_key!r} has type {kind}, not string"
    return None

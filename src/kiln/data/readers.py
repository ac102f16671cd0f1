"""Read one input file into records, whatever its format and however broken it is.

Formats, by file name:
    .txt .md .py                 one document per file
    .jsonl .jsonl.gz .jsonl.zst  one document per line, text in field `text_key`
    .json                        an array of records (first non-whitespace byte `[`), read record by
                                 record without loading the file; otherwise JSON Lines
    .parquet                     one document per row, text in column `text_key`

A document's meta says where it came from (`path`, and `line`, `record` or `row`) and carries the
record's own `id` field when it has one, plus the fields listed in `keep` (`data.keep_fields`); a
field that is missing or null is left out.

Bad input never raises: it comes out as `Quarantined` (file, line, reason) or
`Drop("read", "empty")`, so the run goes on and the report counts it. Only
programming errors raise.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from kiln.config.data import ID_FIELD
from kiln.data.records import Doc, Drop, Quarantined, Record

FORMATS = {
    ".txt": "text", ".md": "text", ".py": "text",
    ".jsonl": "jsonl", ".json": "json", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl",
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
    """`text`, `jsonl`, `json` (array or JSON Lines), `parquet`, or None for an unsupported file name."""
    lower = name.lower()
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    return None


def read_file(task: FileTask, text_key: str, limit: int | None = None,
              keep: tuple[str, ...] = ()) -> Iterator[Record]:
    """Records of one file in order, at most `limit` of them; `keep`: fields copied into meta besides `id`."""
    fields = _Fields(text_key, tuple(dict.fromkeys(k for k in (ID_FIELD, *keep) if k != text_key)))
    records = _read(task, fields)
    return itertools.islice(records, limit) if limit is not None else records


@dataclass(frozen=True)
class _Fields:
    text: str
    meta: tuple[str, ...]
    """Fields copied into the document's meta when a record has them (never the text field)."""


def _read(task: FileTask, fields: _Fields) -> Iterator[Record]:
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
    elif fmt == "jsonl" or (fmt == "json" and not _is_array(task.path)):
        yield from _read_jsonl(task, fields)
    elif fmt == "json":
        yield from _read_array(task, fields)
    else:
        assert fmt == "parquet", task.path
        yield from _read_parquet(task, fields)


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


def _read_jsonl(task: FileTask, fields: _Fields) -> Iterator[Record]:
    lineno = 0
    try:
        for lineno, raw in enumerate(_lines(_chunks(task.path)), start=1):
            yield _parse_line(raw, task, lineno, fields)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, TruncatedStream) as e:
        # Lines before the failure are kept; the rest of the file is one quarantined record.
        yield Quarantined(task.path, lineno + 1, f"unreadable from line {lineno + 1} on: {e}")


def _parse_line(raw: bytes, task: FileTask, lineno: int, fields: _Fields) -> Record:
    if not raw.strip():
        return Drop("read", "empty")
    try:
        # A byte-order mark (Windows editors write one) is encoding metadata, not text: drop it on line 1.
        obj = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        return Quarantined(task.path, lineno, f"invalid UTF-8 at byte {e.start}")
    except (ValueError, RecursionError) as e:
        return Quarantined(task.path, lineno, f"invalid JSON: {e}")
    return _json_record(obj, task, fields, lineno, {"line": lineno})


def _json_record(obj, task: FileTask, fields: _Fields, line: int, where: dict, label: str = "") -> Record:
    """A parsed JSON record as a document, or quarantined at `line` (`label` starts the reason)."""
    problem = _record_problem(obj, fields.text)
    if problem:
        return Quarantined(task.path, line, label + problem)
    meta = {"path": task.rel, **where}
    for key in fields.meta:
        value = obj.get(key)
        if value is None:
            continue
        if not _encodable(json.dumps(value, ensure_ascii=False)):
            return Quarantined(task.path, line, f"{label}field {key!r} holds a lone surrogate (\\ud800-\\udfff)")
        meta[key] = value
    return Doc(obj[fields.text], task.source, meta)


def _record_problem(obj, text_key: str) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if text_key not in obj:
        fields = ", ".join(list(obj)[:10]) or "none"
        return f"no field {text_key!r} (fields: {fields}); set data.text_key"
    text = obj[text_key]
    if not isinstance(text, str):
        return f"field {text_key!r} is {type(text).__name__}, not a string"
    if not _encodable(text):
        return f"field {text_key!r} holds a lone surrogate (\\ud800-\\udfff)"
    return None


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


# ---------------------------------------------------------------- JSON arrays


def _is_array(path: str) -> bool:
    """The first byte after any byte-order mark and whitespace is `[` (a `.json` export, not JSON Lines)."""
    with open(path, "rb") as f:
        head = f.read(3).removeprefix(codecs.BOM_UTF8)
        while head is not None:
            stripped = head.lstrip(b" \t\r\n")
            if stripped:
                return stripped.startswith(b"[")
            head = f.read(CHUNK_BYTES) or None
    return False


class _BadArray(Exception):
    """The array cannot be read on from here: the rest of the file is one quarantined record."""


def _read_array(task: FileTask, fields: _Fields) -> Iterator[Record]:
    """One record per array element. A bad element (not an object, no text, invalid UTF-8, a lone surrogate)
    is quarantined and reading goes on; invalid JSON or a cut ends the file, elements before it kept."""
    try:
        with open(task.path, "rb") as f:
            text = _ArrayText(f)
            try:
                yield from _elements(text, task, fields)
            except (OSError, _BadArray) as e:
                where = f"unreadable from record {text.index} on: {e}" if isinstance(e, OSError) else str(e)
                yield Quarantined(task.path, text.line_at(text.pos), where)
    except OSError as e:   # open() itself
        yield Quarantined(task.path, None, f"unreadable: {e.strerror or e}")


def _elements(text: _ArrayText, task: FileTask, fields: _Fields) -> Iterator[Record]:
    text.expect("[")
    closed = text.peek() == "]"
    if closed:
        text.pos += 1
    while not closed:
        obj, start, end = text.value()
        line, label = text.line_at(start), f"record {text.index}: "
        if text.has_invalid_utf8(start, end):
            yield Quarantined(task.path, line, label + "invalid UTF-8")
        else:
            yield _json_record(obj, task, fields, line, {"record": text.index}, label)
        closed = text.separator() == "]"
    if text.peek():
        raise _BadArray(f"data after the closing ] (line {text.line_at(text.pos)}) is not read")


class _ArrayText:
    """The decoded text of a JSON array, read in chunks as the parser needs them.

    Decoded with `surrogateescape`, so a byte that is not UTF-8 becomes a lone surrogate in `buf` (where
    valid UTF-8 never makes one) and spoils only its own record; json's C scanner parses one element at a
    time with `raw_decode`. (ijson's C backend stops the whole file at the first such byte, and at a
    `\\ud800` escape.)
    """

    def __init__(self, f) -> None:
        self.file = f
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.eof, self.dirty = "", 0, False, False
        self.index = 0   # records started so far
        self.lines, self.counted = 0, 0   # newlines in the file before buf[counted]
        if f.read(3) != codecs.BOM_UTF8:   # a byte-order mark is encoding metadata, not text
            f.seek(0)

    def _fill(self) -> bool:
        """Drop buf[:pos] and read at least as much as is pending (linear time for a huge element).
        False, and nothing changed, once the end of the file was reached before."""
        if self.eof:
            return False
        raw = self.file.read(max(CHUNK_BYTES, len(self.buf) - self.pos))
        self.eof = not raw
        self.line_at(self.pos)
        self.buf = self.buf[self.pos:] + self.decoder.decode(raw, final=self.eof)
        self.counted = self.pos = 0
        self.dirty = not _encodable(self.buf)
        return True

    def line_at(self, pos: int) -> int:
        """1-based line of buf[pos]; positions asked for never go back."""
        self.lines += self.buf.count("\n", self.counted, pos)
        self.counted = pos
        return self.lines + 1

    def peek(self) -> str:
        """The next non-whitespace character (pos moves to it), or "" at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, ch: str) -> None:
        assert self.peek() == ch, "_is_array saw it"
        self.pos += 1

    def value(self) -> tuple[object, int, int]:
        """The next element and where it lies in `buf`; _BadArray when it is not JSON or is cut off."""
        self.index += 1
        while True:
            self.peek()
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if _maybe_cut(e) and self._fill():
                    continue
                raise _BadArray(_array_error(e, self.index, self.eof)) from None
            except RecursionError:
                raise _BadArray(f"record {self.index}: nested too deeply; the rest of the file is not read") from None
            if end < len(self.buf) or not self._fill():   # at the end of the text a number may go on
                start, self.pos = self.pos, end
                return obj, start, end

    def separator(self) -> str:
        ch = self.peek()
        if ch not in (",", "]"):
            what = "the file ends (truncated)" if not ch else f"{ch!r} stands"
            raise _BadArray(f"after record {self.index}: {what} where `,` or `]` should; the rest is not read")
        self.pos += 1
        return ch

    def has_invalid_utf8(self, start: int, end: int) -> bool:
        return self.dirty and _SURROGATE.search(self.buf, start, end) is not None


_WHITESPACE = re.compile(r"[ \t\r\n]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_DECODER = json.JSONDecoder()


def _maybe_cut(e: json.JSONDecodeError) -> bool:
    """An error that more text could cure: an open string, or a token that the end of the text cuts short
    (`tru`, `1e`, a `\\u12` escape, a missing `,` or `}`)."""
    if e.msg.startswith("Unterminated string"):
        return True
    rest = e.doc[e.pos:e.pos + 7]
    return len(rest) <= 6 and not any(c in rest for c in ",]}")


def _array_error(e: json.JSONDecodeError, index: int, eof: bool) -> str:
    if eof and _maybe_cut(e):
        return f"record {index}: the file ends inside it (truncated); records before it are kept"
    return f"record {index}: invalid JSON ({e.msg}); the rest of the file is not read"


# ---------------------------------------------------------------- Parquet


def _read_parquet(task: FileTask, fields: _Fields) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(task.path)
        kept = [k for k in fields.meta if k in pf.schema_arrow.names]
        problem = _text_column_problem(pf.schema_arrow, fields.text) or _meta_column_problem(pf.schema_arrow, kept)
        if problem:
            yield Quarantined(task.path, None, problem)
            return
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[fields.text, *kept]):
            extra = {k: batch.column(k).to_pylist() for k in kept}
            for i, value in enumerate(batch.column(fields.text).to_pylist()):
                row += 1
                if value is None:
                    yield Quarantined(task.path, row, f"column {fields.text!r} is null")
                    continue
                meta = {"path": task.rel, "row": row}
                meta.update((k, v[i]) for k, v in extra.items() if v[i] is not None)
                yield Doc(value, task.source, meta)
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


def _meta_column_problem(schema, kept: list[str]) -> str | None:
    for name in kept:
        kind = schema.field(name).type
        if not _json_type(kind):
            fix = " (a record's `id` is always kept)" if name == ID_FIELD else ", or drop it from data.keep_fields"
            return f"column {name!r} has type {kind}, which meta (JSON) cannot hold: cast it to string in the file{fix}"
    return None


def _json_type(kind) -> bool:
    """Arrow types whose Python values json.dumps writes as they are: strings, numbers, booleans, null,
    and lists and structs of those."""
    import pyarrow as pa

    t = pa.types
    if t.is_list(kind) or t.is_large_list(kind):
        return _json_type(kind.value_type)
    if t.is_struct(kind):
        return all(_json_type(f.type) for f in kind)
    return any(is_(kind) for is_ in (t.is_string, t.is_large_string, t.is_string_view, t.is_integer,
                                      t.is_floating, t.is_boolean, t.is_null))

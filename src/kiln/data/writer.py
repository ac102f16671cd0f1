"""Stream documents of one split into Parquet shards `part-00000.parquet`, `part-00001.parquet`, ...

Columns (all string): id, text, source, meta (JSON). A shard is written to a
hidden temp name and renamed, so a `*.parquet` glob never sees half a shard.
An empty split has a folder and no shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kiln.data.records import Doc

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("meta", pa.string())])
SHARD_MAX_BYTES = 256 << 20
"""Also close a shard at this much text, so a few huge documents cannot hold gigabytes in memory."""


class ShardWriter:
    def __init__(self, folder: Path, shard_docs: int, shard_max_bytes: int = SHARD_MAX_BYTES):
        self.folder = folder
        self.shard_docs = shard_docs
        self.shard_max_bytes = shard_max_bytes
        self.shards = 0
        self.docs = 0
        self.bytes = 0
        self._rows: dict[str, list[str]] = {name: [] for name in SCHEMA.names}
        self._buffered_bytes = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, doc: Doc, doc_id: str, n_bytes: int) -> None:
        """Buffer one document (`n_bytes`: its UTF-8 size); writes a shard when one is full."""
        self._rows["id"].append(doc_id)
        self._rows["text"].append(doc.text)
        self._rows["source"].append(doc.source)
        self._rows["meta"].append(json.dumps(doc.meta, ensure_ascii=False, separators=(",", ":")))
        self.docs += 1
        self.bytes += n_bytes
        self._buffered_bytes += n_bytes
        if len(self._rows["id"]) >= self.shard_docs or self._buffered_bytes >= self.shard_max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._rows["id"]:
            return
        table = pa.table(self._rows, schema=SCHEMA)
        final = self.folder / f"part-{self.shards:05d}.parquet"
        tmp = self.folder / f".{final.name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
        self.shards += 1
        self._rows = {name: [] for name in SCHEMA.names}
        self._buffered_bytes = 0

    def close(self) -> None:
        self.flush()

"""Document ids and the train/val/test split, decided in the parent process.

Exact dedup is not a step here: it needs every file's documents, so the parent
runs it on the 128-bit text hashes the workers saved (`run._account`).

Both ids and splits are pure functions of the (normalised) text, hashed with
xxHash, whose output is defined byte for byte on every platform: the same
document gets the same id and lands in the same split on every machine and
every run, whatever else is in the corpus. Identical texts share one id and so
one split, which is why duplicates (when dedup is off) cannot leak from train
into val.
"""

from __future__ import annotations

import xxhash

SPLITS = ("train", "val", "test")


def doc_id(text: str) -> str:
    """16 hex digits: xxh3_64 of the UTF-8 text."""
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8"))


def split_of(doc_id_hex: str, val_fraction: float, test_fraction: float) -> str:
    """`train`, `val` or `test` from the id's position in [0, 1)."""
    u = int(doc_id_hex, 16) / 2**64   # xxh3_64 is uniform over 64 bits
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"

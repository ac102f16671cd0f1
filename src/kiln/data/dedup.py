"""Document ids, exact deduplication and the train/val/test split: the steps run in the parent process.

Both ids and splits are pure functions of the (normalised) text, hashed with
xxHash, whose output is defined byte for byte on every platform: the same
document gets the same id and lands in the same split on every machine and
every run, whatever else is in the corpus. Identical texts share one id and so
one split, which is why duplicates (when dedup is off) cannot leak from train
into val.
"""

from __future__ import annotations

import dataclasses

import xxhash

from kiln.data.records import ALL_KINDS, Doc, Drop

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


@dataclasses.dataclass
class ExactDedup:
    """Keeps the first document with a given text, drops later ones as `duplicate`.

    Holds one 128-bit digest per kept document in memory (~100 bytes each in a
    Python set: ~1 GB per 10M documents). 128 bits make an accidental collision,
    which would drop a distinct document, practically impossible at any corpus size.
    """

    name: str = "exact_dedup"
    kinds: tuple[str, ...] = ALL_KINDS
    seen: set[int] = dataclasses.field(default_factory=set)

    def __call__(self, doc: Doc) -> Doc | Drop:
        key = xxhash.xxh3_128_intdigest(doc.text.encode("utf-8"))
        if key in self.seen:
            return Drop(self.name, "duplicate")
        self.seen.add(key)
        return doc

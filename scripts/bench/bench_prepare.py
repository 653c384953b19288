#!/usr/bin/env python
"""Bounded memory of the preparation pipeline: peak RSS and throughput at two corpus sizes.

    python scripts/bench/bench_prepare.py --dir /work/bench_data --sizes-mb 200 2000 --workers 2

Writes synthetic text corpora of each size into --dir (deleted at the end unless --keep), then
prepares each with each tokenizer in a fresh subprocess (sizes alternated within a round), while a
monitor samples the resident memory of that process and all its children every 0.1 s. Prints a
markdown table: peak RSS of all processes together, MB/s (source bytes / wall time, tokenizer
loading and worker start-up included), and the ratio of peaks between the largest and smallest
corpus, which should be about 1 when memory does not grow with the corpus.

Tokenizers:
- ``char``: the character-level path (two streaming passes: vocabulary, then encoding);
- ``tiktoken-bpe50k``: GPT-2's code path (a tiktoken encoding with GPT-2's pattern and a 50,257-
  token vocabulary) whose merges are a byte-level BPE trained here on the start of the corpus,
  because GPT-2's own file cannot be downloaded on machines without internet. With
  ``--real-gpt2`` (internet or a TIKTOKEN_CACHE_DIR copy) GPT-2's encoding is used instead.

The synthetic text: sentences of words drawn by frequency from Shakespeare's plays (the default
corpus), with numbers and punctuation, in 16 MB blocks from distinct seeds so no two pieces are
alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

BLOCK_MB = 16


# ---------------------------------------------------------------------------------------------
# corpora


def words_and_weights():
    import re

    from trainer.data import load_shakespeare, default_cache_dir

    load_shakespeare()  # fetches the text once
    text = (default_cache_dir() / "shakespeare" / "input.txt").read_text()
    counts: dict[str, int] = {}
    for w in re.findall(r"[A-Za-z']+", text):
        counts[w] = counts.get(w, 0) + 1
    words = sorted(counts)
    return words, [counts[w] for w in words]


def text_block(seed: int, nbytes: int, words, weights) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    n_words = nbytes // 5
    drawn = rng.choice(len(words), n_words, p=p)  # all at once: choice(p=...) per call is O(vocabulary)
    lengths = rng.integers(5, 25, n_words // 5)
    numbers, ends = rng.integers(0, 100000, len(lengths)), rng.choice(list(".!?,;"), len(lengths))
    out, start, size = [], 0, 0
    for n, num, end in zip(lengths, numbers, ends):
        sentence = " ".join(words[i] for i in drawn[start : start + n])
        start += n
        if num % 5 == 0:
            sentence += f" {num}"
        line = sentence[:1].upper() + sentence[1:] + end + "\n"
        out.append(line)
        size += len(line)
        if size >= nbytes or start >= n_words:
            break
    return "".join(out)


def make_corpus(path: Path, size_mb: int, blocks: list[str]) -> None:
    import numpy as np

    rng = np.random.default_rng(size_mb)
    target = size_mb * 1_000_000
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            block = blocks[rng.integers(len(blocks))]
            part = block[: target - written]
            f.write(part)
            written += len(part.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# one measured preparation (run in a subprocess)


def prepare_one(source: str, out: str, tokenizer: str, tok_file: str | None, workers: int) -> None:
    from trainer.data import prepare as prep
    from trainer.data import sources
    from trainer.data.bpe import TiktokenTokenizer
    from trainer.data.tokenizer import tokenizer_from_dict

    tok = None
    if tokenizer == "tiktoken-bpe50k":
        tok = tokenizer_from_dict(json.loads(Path(tok_file).read_text()))
    elif tokenizer == "gpt2":
        tok = TiktokenTokenizer.named("gpt2")
    files = [Path(source)]
    settings = {"tokenizer": tokenizer if tokenizer == "char" else "custom", "val_fraction": 0.001,
                "shard_tokens": 100_000_000}
    prep.prepare(lambda: sources.text_pieces(files, 0.001), out, settings, total_bytes=files[0].stat().st_size,
                 workers=workers, progress=False, tokenizer=tok)


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MB (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = pages
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total * os.sysconf("SC_PAGE_SIZE") / 1e6


def measure(source: Path, out: Path, tokenizer: str, tok_file: str | None, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--one", str(source), str(out), tokenizer, tok_file or "-", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peak, done = 0.0, threading.Event()

    def monitor():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.1)

    t = threading.Thread(target=monitor)
    t.start()
    rc = proc.wait()
    done.set()
    t.join()
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"preparation failed ({rc}): {' '.join(cmd)}")
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out)
    size = source.stat().st_size
    return {"mb": size / 1e6, "peak_mb": peak, "mb_s": size / 1e6 / wall, "wall_s": wall,
            "tokens": meta["train_tokens"] + meta["val_tokens"]}


# ---------------------------------------------------------------------------------------------


def build_bpe50k(sample_path: Path, out: Path, vocab: int) -> str:
    """A byte-level BPE with GPT-2's vocabulary size, trained on the first 20 MB, as tiktoken."""
    from trainer.data.bpe import BPETokenizer, tiktoken_from_bpe
    from trainer.data.tokenizer import save_tokenizer

    with open(sample_path, encoding="utf-8") as f:
        sample = f.read(20_000_000)
    # numbers and rare words in the synthetic text leave too few merges for 50k tokens: add
    # made-up words (seeded) so the vocabulary reaches GPT-2's size
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    extra = " ".join("".join(rng.choice(letters, rng.integers(4, 10))) for _ in range(400_000))
    bpe = BPETokenizer.train([sample, extra], vocab)
    tok = tiktoken_from_bpe(bpe, f"bpe{bpe.vocab_size}-as-tiktoken")
    save_tokenizer(tok, out)
    return str(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        _, _, source, out, tokenizer, tok_file, workers = sys.argv
        prepare_one(source, out, tokenizer, None if tok_file == "-" else tok_file, int(workers))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/work/bench_data")
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--tokenizers", nargs="+", default=["char", "tiktoken-bpe50k"])
    ap.add_argument("--real-gpt2", action="store_true", help="use tiktoken's GPT-2 encoding (needs it cached)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the generated corpora")
    args = ap.parse_args()

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    words, weights = words_and_weights()
    blocks = [text_block(seed, BLOCK_MB * 1_000_000, words, weights) for seed in range(8)]
    corpora = {}
    for mb in args.sizes_mb:
        corpora[mb] = d / f"synthetic_{mb}mb.txt"
        if not corpora[mb].exists() or corpora[mb].stat().st_size < mb * 1_000_000:
            make_corpus(corpora[mb], mb, blocks)
    del blocks
    tokenizers = [("gpt2" if (t == "tiktoken-bpe50k" and args.real_gpt2) else t) for t in args.tokenizers]
    tok_file = None
    if "tiktoken-bpe50k" in tokenizers:
        tok_file = build_bpe50k(corpora[min(corpora)], d / "bpe50k-tiktoken.json", 50257)
        vocab = len(json.loads(Path(tok_file).read_text())["ranks"]) + 1
        print(f"tiktoken-bpe50k: {vocab} tokens (GPT-2: 50257)", flush=True)

    load = os.getloadavg()
    print(f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores; "
          f"workers={args.workers}", flush=True)
    rows = {}
    for r in range(args.rounds):
        for tok in tokenizers:
            order = sorted(corpora) if r % 2 == 0 else sorted(corpora, reverse=True)  # alternate
            for mb in order:
                res = measure(corpora[mb], d / "out", tok, tok_file, args.workers)
                rows.setdefault((tok, mb), []).append(res)
                print(f"round {r} {tok} {mb} MB: peak {res['peak_mb']:.0f} MB, {res['mb_s']:.2f} MB/s, "
                      f"{res['tokens']:,} tokens, {res['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print("| tokenizer | corpus | peak RSS, all processes (MB) | MB/s | tokens | peak ratio vs smallest |")
    print("|---|---|---|---|---|---|")
    for tok in tokenizers:
        base = max(r["peak_mb"] for r in rows[(tok, min(corpora))])
        for mb in sorted(corpora):
            res = rows[(tok, mb)]
            peak = max(x["peak_mb"] for x in res)
            rates = "/".join(f"{x['mb_s']:.2f}" for x in res)
            print(f"| {tok} | {res[0]['mb']:.0f} MB | {peak:.0f} | {rates} | {res[0]['tokens']:,} | {peak / base:.2f} |")
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if not args.keep:
        for p in corpora.values():
            p.unlink(missing_ok=True)
        if tok_file:
            Path(tok_file).unlink(missing_ok=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Tokenize a corpus of any size into token shards for ``data=tokens``; run it before training.

Examples::

    python scripts/prepare.py corpus.txt --out data/corpus-char                     # char-level
    python scripts/prepare.py 'texts/*.txt' --tokenizer bpe --vocab-size 8192 --out data/texts-bpe
    python scripts/prepare.py docs.jsonl --text-field content --tokenizer gpt2 --out data/docs
    python scripts/prepare.py --hf Skylion007/openwebtext --tokenizer gpt2 --out data/owt   # needs [hf]
    python scripts/prepare.py --hf HuggingFaceFW/fineweb --hf-config sample-10BT --tokenizer gpt2 --out data/fineweb10B
    python scripts/train.py data=tokens data.path=data/owt +experiment=gpt2_owt

The source is streamed (never held in memory) and tokenized by ``--workers`` processes; the output
is ``train_*.bin``/``val_*.bin`` shards in llm.c's format, ``tokenizer.json`` and ``meta.json``
(written last). An interrupted preparation is started over by running the same command again.
Under torchrun, prepare before launching: ranks would otherwise wait for one rank's preparation.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("source", nargs="?", help="a text/JSONL/Parquet file, a directory or a glob (or use --hf)")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--tokenizer", default="gpt2", choices=["char", "bpe", "gpt2"], help="default: gpt2 (tiktoken)")
    p.add_argument("--tokenizer-path", help="a Hugging Face tokenizer.json to use instead of --tokenizer")
    p.add_argument("--vocab-size", type=int, help="bpe only (default 2048)")
    p.add_argument("--bpe-sample-bytes", type=int, default=100_000_000,
                   help="bpe trains on this many bytes from the start of the training split (default 100 MB)")
    p.add_argument("--val-fraction", type=float, help="default 0.1 for files, 0.0005 for --hf (FineWeb/OWT-sized)")
    p.add_argument("--text-field", default="text", help="JSONL / Parquet / HF field holding the text")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M, as llm.c)")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: all cores; 0: in this process)")
    p.add_argument("--hf", metavar="NAME", help="a Hugging Face dataset, streamed with `datasets` (pip install 'gptlab[hf]')")
    p.add_argument("--hf-config", help="the dataset's configuration (e.g. sample-10BT)")
    p.add_argument("--split", default="train", help="the dataset split to read (default train)")
    p.add_argument("--hf-data-files", nargs="+", help="data_files for --hf json / parquet on local files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainer.data import open_token_dir
    from trainer.data.prepare import prepare_files, prepare_hf

    common = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer_path,
                  text_field=args.text_field, bpe_sample_bytes=args.bpe_sample_bytes, shard_tokens=args.shard_tokens,
                  workers=args.workers, progress=not args.quiet)
    start = time.perf_counter()
    try:
        if (args.source is None) == (args.hf is None):
            raise UserError("give either a SOURCE path or --hf NAME")
        if args.hf:
            out = prepare_hf(args.hf, args.out, config=args.hf_config, split=args.split, data_files=args.hf_data_files,
                             val_fraction=0.0005 if args.val_fraction is None else args.val_fraction, **common)
        else:
            out = prepare_files(args.source, args.out, val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
                                **common)
        data = open_token_dir(out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {len(data.train):,} train + {len(data.val):,} val tokens ({data.tokenizer.name}, vocab "
          f"{data.vocab_size}) in {time.perf_counter() - start:.1f} s; train with: "
          f"python scripts/train.py data=tokens data.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Export a run as a Hugging Face model that ``transformers`` loads as it is.

    python scripts/export.py runs/<run> --format hf out/my-gpt          # the run's latest checkpoint
    python scripts/export.py runs/<run>/ckpt_best.pt --format hf out/my-gpt

writes ``config.json`` and ``model.safetensors`` (float32), plus ``tokenizer.json`` and
``tokenizer_config.json`` when the run's tokenizer has a Hugging Face form (GPT-2's tiktoken
encoding, or a BPE ``tokenizer.json``; the character tokenizer has none). Then::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/my-gpt")

Learned-position models export as GPT-2 (``GPT2LMHeadModel``), rotary ones as GPT-NeoX
(``GPTNeoXForCausalLM``, sequential residual, every head dimension rotated): both compute the
same logits as this project's model (see models/hf.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models import GPTConfig, hf
from trainer.data.bpe import EOT, hf_tokenizer_json
from trainer.data.tokenizer import tokenizer_from_dict
from trainer.errors import OutputError, UserError, user_errors
from trainer.rundir import load_checkpoint, os_reason

FORMATS = ("hf",)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file, or a run directory (uses its ckpt_last.pt)")
    p.add_argument("out_dir", help="directory to write (created; files of the same names are replaced)")
    p.add_argument("--format", choices=FORMATS, required=True, help="hf: Hugging Face transformers")
    return p


def export_hf(checkpoint: str, out_dir: str | Path) -> list[str]:
    """Write the Hugging Face files for ``checkpoint`` into ``out_dir``; returns the names written.
    A tokenizer that cannot be loaded here (GPT-2's tiktoken file offline) leaves the model files
    written and the tokenizer's out, with a note on stderr."""
    state = load_checkpoint(checkpoint)
    config = GPTConfig(**state["model_args"])
    tok = None
    if state.get("tokenizer"):
        try:
            tok = tokenizer_from_dict(state["tokenizer"])
        except UserError as e:
            print(f"note: the run's tokenizer cannot be loaded here, so no tokenizer files: {e}", file=sys.stderr)
    eot = None if tok is None else tok.eot_id
    hf_config, tensors = hf.hf_from_state_dict(state["model"], config, eot)
    out = Path(out_dir)
    try:
        hf.write_pretrained(out, hf_config, tensors)
        written = [hf.CONFIG, hf.WEIGHTS]
        tokenizer_json = None if tok is None else hf_tokenizer_json(tok)
        if tokenizer_json is not None:
            (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
            special = {"eos_token": EOT, "bos_token": EOT} if eot is not None else {}
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
                          "clean_up_tokenization_spaces": False, **special}
            (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
            written += ["tokenizer.json", "tokenizer_config.json"]
    except OSError as e:
        raise OutputError(f"cannot write {out}: {os_reason(e)}") from e
    return written


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        written = export_hf(args.checkpoint, args.out_dir)
    except (*user_errors(), hf.InteropError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(written)} to {args.out_dir}")
    if "tokenizer.json" not in written:
        print("no tokenizer files: the run has no tokenizer with a Hugging Face form here (character-level, "
              "none, or not loadable); pass token ids to the model, or train with a BPE or GPT-2 tokenizer",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

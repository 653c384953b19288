"""``init_from``: start a run from a Hugging Face GPT-2 (fine-tuning), in the trainer's terms.

``init_from=scratch`` (default) trains from random weights. ``init_from=gpt2|gpt2-medium|gpt2-large|
gpt2-xl|/path/to/dir`` reads the checkpoint's ``config.json`` before anything is built and sets the
model's shape (``model.*``) from it, so the model built next has the checkpoint's shape; its weights
are loaded onto that model. A shape key the command line sets to another value is an error (a
smaller ``model.block_size`` is allowed: the position table is cropped, as nanoGPT does); settings
that are not shapes (``model.dropout``) stay the run's own.

The run's saved config records ``init_from`` and the checkpoint's shape, and its checkpoints hold the
fine-tuned weights: a resume builds the model from them and never reads the Hugging Face files again.
The mapping itself lives in ``models/hf.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models import hf
from trainer.config import override_key
from trainer.errors import CheckpointError, ConfigError

SCRATCH = "scratch"
SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "gelu", "pos")


@dataclass
class Pretrained:
    """A checkpoint read for ``init_from``: where it came from, its shape, and its tensors until loaded."""

    name: str
    directory: str
    shape: dict
    tensors: dict | None

    def check_vocab(self, data) -> None:
        """The data's token ids must fit the checkpoint's vocabulary (the model's, unpadded)."""
        from trainer.data import model_vocab_size

        try:
            model_vocab_size(data, self.shape["vocab_size"])
        except ConfigError:
            raise ConfigError(f"init_from={self.name} has a {self.shape['vocab_size']}-token vocabulary but the data has "
                              f"{data.vocab_size} tokens; train on data tokenized with the checkpoint's tokenizer "
                              "(GPT-2's: data.tokenizer=gpt2)") from None

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the checkpoint's weights into ``model`` (built with :func:`configure`'s shape)."""
        try:
            state = hf.state_dict_from_hf(self.tensors, model.config, f"init_from={self.name} ({self.directory})")
        except hf.InteropError as e:
            raise CheckpointError(str(e)) from None
        model.load_state_dict(state)
        self.tensors = None  # the model holds them now

    def describe(self) -> str:
        s = self.shape
        return (f"init_from={self.name}: weights from {self.directory} ({s['n_layer']} layers, {s['n_head']} heads, "
                f"width {s['n_embd']}, vocab {s['vocab_size']}, context {s['block_size']})")


def configure(cfg, overrides: list[str], resumed: dict | None = None) -> Pretrained | None:
    """Set ``cfg.model``'s shape from ``cfg.init_from``'s checkpoint and return it for loading; None
    for ``init_from=scratch`` and on resume (``resumed``: the checkpoint's state), where the run's
    own checkpoint holds the weights and an ``init_from`` other than the run's is refused."""
    name = str(cfg.get("init_from") or SCRATCH)
    if resumed is not None:
        saved = str((resumed.get("config") or {}).get("init_from") or SCRATCH)
        if name != saved:
            raise ConfigError(f"init_from={name} cannot change on resume: the run started from {saved} and continues "
                              "from its own checkpoint; start a new run to fine-tune from another model")
        return None
    if name == SCRATCH:
        return None
    try:
        directory = hf.find_pretrained(name)
        hf_config, tensors = hf.read_pretrained(directory)
        shape = hf.gpt_config_from_hf(hf_config, f"init_from={name}")
    except hf.InteropError as e:
        raise ConfigError(str(e)) from None
    shape["block_size"] = _check_overrides(cfg, overrides, shape, name)
    for key in SHAPE_KEYS:
        cfg.model[key] = shape[key]
    return Pretrained(name, str(directory), shape, tensors)


def _check_overrides(cfg, overrides: list[str], shape: dict, name: str) -> int:
    """Raise ConfigError for a ``model.<shape key>`` the command line sets to another value than the
    checkpoint's; returns the block size (the checkpoint's, or a smaller one the command line set)."""
    named = {override_key(o) for o in overrides}
    block, diffs = shape["block_size"], []
    for key in SHAPE_KEYS:
        value = cfg.model.get(key)
        if f"model.{key}" not in named or value is None or value == shape[key]:  # null: the checkpoint's
            continue
        if key == "block_size" and isinstance(value, int) and 0 < value < shape[key]:
            block = value  # a shorter context: the position table is cropped
        elif key == "block_size":
            diffs.append(f"model.block_size={value} exceeds its {shape[key]} learned positions")
        elif key == "vocab_size" and isinstance(value, int) and value < shape[key]:
            diffs.append(f"model.vocab_size={value} is smaller than its {shape[key]}-token vocabulary")
        elif key == "vocab_size":
            diffs.append(f"model.vocab_size={value} would add embedding rows to its {shape[key]}: with the head tied, "
                         "their logits would change its predictions")
        elif key == "pos":
            diffs.append(f"model.pos={value}: it has GPT-2's learned position table (pos=learned), no rotary weights")
        elif key == "n_head":
            diffs.append(f"model.n_head={value}: its attention is split into {shape[key]} heads of width "
                         f"{shape['n_embd'] // shape['n_head']}; another head count does not map its weights")
        else:
            diffs.append(f"model.{key}={value} but it has {key}={shape[key]}")
    if diffs:
        raise ConfigError(f"init_from={name} does not fit the command line's model settings: {'; '.join(diffs)} "
                          "(the model's shape comes from the checkpoint: drop these overrides)")
    return block

"""GPT-2 weights in and out: Hugging Face checkpoints (``config.json`` + ``model.safetensors``) <-> :class:`GPT`.

The mapping is the concept here; everything else (finding the files, the trainer's config) is plumbing.
Hugging Face's GPT-2 keeps our module names under ``transformer.`` (``wte``, ``wpe``, ``h.N.ln_1``,
``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_f``) but its projections
are ``Conv1D`` layers, whose weights are stored (in, out): the transpose of ``nn.Linear``'s (out, in).
Its ``gelu_new`` is our ``gelu="tanh"``, its LayerNorm epsilon 1e-5 is ``nn.LayerNorm``'s default,
its head is tied to ``wte`` as ours is, and ``n_positions`` is our ``block_size``.

Rotary models (``pos="rope"``) have no GPT-2 form; they export as GPT-NeoX, the architecture in
``transformers`` that is ours exactly when ``use_parallel_residual=false`` (sequential pre-LN
blocks), ``rotary_pct=1`` (every head dimension rotated) and its half-split ``rotate_half`` pairing
(ours: pairs ``(i, i + D/2)``). Its fused ``query_key_value`` interleaves q, k, v per head, ours
holds all q heads, then all k, then all v: the rows are permuted. Llama would not do: it has
RMSNorm and a gated SiLU MLP where we have LayerNorm and a GELU MLP.

Imports: torch; ``safetensors`` when files are read or written; ``huggingface_hub`` only to download
a named GPT-2 that is not in the local cache. Never the trainer, never ``transformers``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
# init_from names -> Hugging Face repositories (OpenAI's releases; "gpt2" was the old id of the first)
GPT2_REPOS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
_LEGACY_IDS = {"openai-community/gpt2": "gpt2", "openai-community/gpt2-medium": "gpt2-medium",
               "openai-community/gpt2-large": "gpt2-large", "openai-community/gpt2-xl": "gpt2-xl"}
GELU_FROM_HF = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}
GELU_TO_HF = {"tanh": "gelu_new", "exact": "gelu"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older GPT-2 files carry
LN_EPS = 1e-5


class InteropError(ValueError):
    """A checkpoint or model that cannot be mapped between gptlab and Hugging Face; the message
    says why and what to do."""


# ---------------------------------------------------------------------------------------------
# the mapping: config and tensors


def gpt_config_from_hf(hf: dict, source: str = "the checkpoint") -> dict:
    """``GPTConfig`` keyword arguments for a Hugging Face GPT-2 ``config.json``; an InteropError for
    anything our model cannot represent exactly."""
    if hf.get("model_type") != "gpt2":
        raise InteropError(f"{source} is a {hf.get('model_type')!r} model; only GPT-2 checkpoints "
                           "(model_type gpt2) can be loaded")
    try:
        n_embd, n_head, n_layer = int(hf["n_embd"]), int(hf["n_head"]), int(hf["n_layer"])
        vocab, positions = int(hf["vocab_size"]), int(hf["n_positions"])
    except (KeyError, TypeError, ValueError) as e:
        raise InteropError(f"{source}'s config.json lacks a GPT-2 shape field ({e})") from None
    if n_head < 1 or n_embd % n_head:
        raise InteropError(f"{source} has n_embd={n_embd} and n_head={n_head}: the head count does not divide "
                           "the width, so it has no per-head split")
    activation = hf.get("activation_function", "gelu_new")
    unsupported = [
        (activation not in GELU_FROM_HF, f"activation_function={activation!r} (supported: {', '.join(GELU_FROM_HF)})"),
        (hf.get("n_inner") not in (None, 4 * n_embd), f"n_inner={hf.get('n_inner')} (ours is 4 * n_embd)"),
        (abs(float(hf.get("layer_norm_epsilon", LN_EPS)) - LN_EPS) > 1e-12,
         f"layer_norm_epsilon={hf.get('layer_norm_epsilon')} (ours is {LN_EPS})"),
        (not hf.get("scale_attn_weights", True), "scale_attn_weights=false"),
        (hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (hf.get("add_cross_attention", False), "add_cross_attention=true"),
        (not hf.get("tie_word_embeddings", True), "tie_word_embeddings=false (our head is tied to wte)"),
    ]
    found = [what for bad, what in unsupported if bad]
    if found:
        raise InteropError(f"{source} uses {'; '.join(found)}, which this GPT does not implement")
    return dict(vocab_size=vocab, block_size=positions, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                bias=True, gelu=GELU_FROM_HF[activation], pos="learned")


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config, source: str = "the checkpoint") -> dict:
    """Our ``GPT.state_dict()`` from a Hugging Face GPT-2's tensors (with or without the
    ``transformer.`` prefix). ``config`` may have a shorter ``block_size`` than the file's
    ``n_positions``: the position table is cropped (as nanoGPT's ``crop_block_size``)."""
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.endswith(BUFFERS)}
    head = plain.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in plain and not torch.equal(head, plain["wte.weight"]):
        raise InteropError(f"{source} has an lm_head that differs from wte: an untied head, which this GPT "
                           "(head tied to the token embedding) cannot hold")
    expected = _hf_shapes(config)
    missing = [k for k in expected if k not in plain]
    extra = [k for k in plain if k not in expected]
    if missing or extra:
        what = [f"missing {', '.join(missing[:4])}" if missing else "", f"unexpected {', '.join(extra[:4])}" if extra else ""]
        raise InteropError(f"{source} does not hold a GPT-2 with its config's shape ({'; '.join(w for w in what if w)})")
    out = {}
    for name, shape in expected.items():
        t = plain[name].t() if name.endswith(CONV1D) else plain[name]  # Conv1D (in, out) -> Linear (out, in)
        if name == "wpe.weight":
            t = t[: config.block_size]  # a shorter context: the first block_size positions
        want = shape[::-1] if name.endswith(CONV1D) else shape
        if tuple(t.shape) != want:
            raise InteropError(f"{source}: {name} has shape {tuple(plain[name].shape)}, not the {want} its config implies")
        out[f"transformer.{name}"] = t.to(torch.float32).contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face GPT-2 of this shape, as the file stores it (Conv1D: (in, out))."""
    C, V = config.n_embd, config.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "attn.c_attn.weight": (C, 3 * C),
                       p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                       p + "ln_2.weight": (C,), p + "ln_2.bias": (C,), p + "mlp.c_fc.weight": (C, 4 * C),
                       p + "mlp.c_fc.bias": (4 * C,), p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,)})
    return shapes | {"ln_f.weight": (C,), "ln_f.bias": (C,)}


def hf_from_state_dict(state: dict[str, torch.Tensor], config, eot_id: int | None = None) -> tuple[dict, dict]:
    """(``config.json`` dict, tensors) of the Hugging Face model equal to our ``GPT``: GPT-2 for
    learned positions, GPT-NeoX for rotary ones. Missing biases (``bias=False``) are written as
    zeros, which computes the same function."""
    if config.pos == "rope":
        return _neox_config(config, eot_id), _neox_tensors(state, config)
    tensors = {}
    for name, shape in _hf_shapes(config).items():
        ours = f"transformer.{name}"
        t = state[ours] if ours in state else torch.zeros(shape)  # bias=False: zero biases
        tensors[f"transformer.{name}"] = (t.t() if name.endswith(CONV1D) else t).float().contiguous()
    return _gpt2_config(config, eot_id), tensors


def _gpt2_config(config, eot_id: int | None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": GELU_TO_HF[config.gelu], "layer_norm_epsilon": LN_EPS,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,  # no attention dropout here
        "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
    }


def _neox_config(config, eot_id: int | None) -> dict:
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "intermediate_size": 4 * config.n_embd, "hidden_act": GELU_TO_HF[config.gelu],
        "max_position_embeddings": config.block_size, "rotary_pct": 1.0, "rotary_emb_base": float(config.rope_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base), "partial_rotary_factor": 1.0},
        "layer_norm_eps": LN_EPS, "use_parallel_residual": False, "attention_bias": True,
        "hidden_dropout": config.dropout, "attention_dropout": 0.0, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
    }


def _neox_tensors(state: dict, config) -> dict:
    C, H = config.n_embd, config.n_head
    D = C // H

    def get(name, shape):
        return state[name].float() if name in state else torch.zeros(shape)  # bias=False: zero biases

    out = {"gpt_neox.embed_in.weight": get("transformer.wte.weight", None)}
    for i in range(config.n_layer):
        ours, neox = f"transformer.h.{i}.", f"gpt_neox.layers.{i}."
        # ours: rows [q heads | k heads | v heads]; NeoX: per head [q_h | k_h | v_h]
        w = get(ours + "attn.c_attn.weight", None).view(3, H, D, C).transpose(0, 1).reshape(3 * C, C)
        b = get(ours + "attn.c_attn.bias", (3 * C,)).view(3, H, D).transpose(0, 1).reshape(3 * C)
        out.update({
            neox + "input_layernorm.weight": get(ours + "ln_1.weight", None),
            neox + "input_layernorm.bias": get(ours + "ln_1.bias", (C,)),
            neox + "post_attention_layernorm.weight": get(ours + "ln_2.weight", None),
            neox + "post_attention_layernorm.bias": get(ours + "ln_2.bias", (C,)),
            neox + "attention.query_key_value.weight": w, neox + "attention.query_key_value.bias": b,
            neox + "attention.dense.weight": get(ours + "attn.c_proj.weight", None),
            neox + "attention.dense.bias": get(ours + "attn.c_proj.bias", (C,)),
            neox + "mlp.dense_h_to_4h.weight": get(ours + "mlp.c_fc.weight", None),
            neox + "mlp.dense_h_to_4h.bias": get(ours + "mlp.c_fc.bias", (4 * C,)),
            neox + "mlp.dense_4h_to_h.weight": get(ours + "mlp.c_proj.weight", None),
            neox + "mlp.dense_4h_to_h.bias": get(ours + "mlp.c_proj.bias", (C,)),
        })
    out["gpt_neox.final_layer_norm.weight"] = get("transformer.ln_f.weight", None)
    out["gpt_neox.final_layer_norm.bias"] = get("transformer.ln_f.bias", (C,))
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# files: reading a directory, writing one


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise InteropError("reading and writing Hugging Face weights needs safetensors: "
                           "pip install -e '.[hf-weights]'") from None
    return safetensors.torch


def read_pretrained(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(``config.json`` dict, tensors) of a Hugging Face checkpoint directory (one ``model.safetensors``
    or shards listed in ``model.safetensors.index.json``)."""
    d = Path(directory)
    try:
        hf = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InteropError(f"cannot read {d / CONFIG} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    st = _safetensors()
    if (d / WEIGHTS).is_file():
        files = [d / WEIGHTS]
    elif (d / INDEX).is_file():
        weight_map = json.loads((d / INDEX).read_text(encoding="utf-8")).get("weight_map", {})
        files = [d / name for name in sorted(set(weight_map.values()))]
    else:
        raise InteropError(f"{d} has no {WEIGHTS}; a Hugging Face GPT-2 directory holds {CONFIG} and {WEIGHTS}")
    tensors = {}
    for f in files:
        try:
            tensors.update(st.load_file(str(f)))
        except Exception as e:  # safetensors' own header / size errors
            raise InteropError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    return hf, tensors


def write_pretrained(out_dir: str | os.PathLike, hf_config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """``config.json`` and ``model.safetensors`` in ``out_dir`` (created), as ``save_pretrained`` writes them."""
    st = _safetensors()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / WEIGHTS),
                 metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# finding a checkpoint: a directory, the local Hugging Face cache, or (reachable) the hub


def hub_cache() -> Path:
    """Where ``huggingface_hub`` keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser() / "hub"


def cached_snapshot(repo: str, cache: Path | None = None) -> Path | None:
    """The cached snapshot of ``repo`` (``models--org--name/snapshots/<commit>``) holding both files, if any."""
    cache = cache or hub_cache()
    for repo_id in (repo, _LEGACY_IDS.get(repo)):
        if repo_id is None:
            continue
        base = cache / f"models--{repo_id.replace('/', '--')}"
        ref = base / "refs" / "main"
        commits = [ref.read_text().strip()] if ref.is_file() else []
        commits += sorted(p.name for p in (base / "snapshots").glob("*")) if (base / "snapshots").is_dir() else []
        for commit in commits:
            snap = base / "snapshots" / commit
            if (snap / CONFIG).is_file() and ((snap / WEIGHTS).is_file() or (snap / INDEX).is_file()):
                return snap
    return None


def find_pretrained(init_from: str) -> Path:
    """The directory of ``init_from``: a local directory, or a named GPT-2 from the local cache,
    downloaded only when it is not cached and the hub answers. Otherwise one line saying where to
    put the files."""
    path = Path(os.path.expanduser(str(init_from)))
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise InteropError(f"init_from={init_from}: {path} has no {CONFIG}; a Hugging Face GPT-2 directory "
                               f"holds {CONFIG} and {WEIGHTS}")
        return path
    if init_from not in GPT2_REPOS:
        raise InteropError(f"init_from={init_from!r} is neither a directory nor one of scratch, "
                           f"{', '.join(GPT2_REPOS)}")
    repo = GPT2_REPOS[init_from]
    snap = cached_snapshot(repo)
    if snap is not None:
        return snap
    reason = _download(repo)
    if isinstance(reason, Path):
        return reason
    raise InteropError(
        f"init_from={init_from}: {CONFIG} and {WEIGHTS} of {repo} are not in the Hugging Face cache ({hub_cache()}) "
        f"and cannot be downloaded ({reason}); copy them from a machine that has them into a directory and pass "
        f"init_from=/path/to/dir, or fetch them there with: huggingface-cli download {repo} {CONFIG} {WEIGHTS}"
    )


def _download(repo: str) -> Path | str:
    """The downloaded snapshot, or why there is none."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return "huggingface_hub is not installed: pip install -e '.[hf-weights]'"
    try:
        return Path(snapshot_download(repo, allow_patterns=[CONFIG, WEIGHTS]))
    except Exception as e:  # no network, hub down, repository moved
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__

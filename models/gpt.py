"""A GPT-2 style language model whose attention implementation is injected.

The attention block does the projections and calls ``attn_fn(q, k, v, causal=True)`` on
``(B, H, T, D)`` tensors; it never branches on which implementation it was given. Names follow
GPT-2 (``wte``, ``wpe``, ``h``, ``ln_f``, ``c_attn``, ``c_proj``) so weights are recognizable.

Generation keeps a KV cache, each layer's keys and values as plain tensors (the attention returns
them; :meth:`GPT.forward` keeps them in a list): each new token runs one position through the
model and attends to the cached keys, the attention call then having fewer queries than keys (the
interface's causal mask is aligned to the end of the keys for exactly this).

No dropout on the attention probabilities (nanoGPT's ``attn_dropout``): the attention interface
``fn(q, k, v, causal, scale)`` has no dropout argument, and the blockwise kernels (online, flash)
never hold the normalized probability matrix that dropout would act on. Dropping it in some
implementations and not others would make an attention ablation compare two regularizers.
``dropout`` applies to the embeddings, the attention output projection and the MLP, for every
attention alike.

Positions: learned absolute embeddings (``pos="learned"``, GPT-2's ``wpe``) or rotary embeddings
(``pos="rope"``, Su et al. 2021: q and k rotated by position-dependent angles before the attention
call, so their dot products depend only on relative offsets). The attention implementations see
the same (B, H, T, D) tensors either way.

The speedrun components (modded-nanogpt's techniques, each one ``GPTConfig`` key, each off by
default so the default model is GPT-2's, bitwise): ``norm="rmsnorm"``, ``bias=False``,
``qk_norm``, ``mlp="relu2"``, ``zero_init_proj``, ``tie_embeddings=False``, ``logit_softcap``,
``unet_skips``, ``value_embeddings``, and a sliding attention ``window`` (the config's
``attn.window``, passed to the attention call only when set). Each one's reason is in its
docstring or comment where it acts.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

AttnFn = Callable[..., torch.Tensor]


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (T, head_dim / 2) float32, of the rotary angles ``position * base**(-2i / head_dim)``.

    The angles are formed in float64: positions past a few thousand would otherwise lose the
    low bits that make rotations of nearby positions differ by exactly their offset."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., D): each pair (x[..., i], x[..., i + D/2]) by the angle whose cos and sin
    are given, (T, D/2) for (B, H, T, D) inputs or broadcast to match another layout (the
    half-split pairing of GPT-NeoX and Llama; the math is that of interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@dataclass
class GPTConfig:
    """Model shape. ``block_size`` is the longest context the position table covers."""

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    gelu: str = "tanh"  # "tanh": GPT-2's approximation; "exact": the erf form (nanoGPT's nn.GELU)
    pos: str = "learned"  # "learned": GPT-2's position table; "rope": rotary q/k, no table
    rope_base: float = 10000.0
    # speedrun components; the defaults are GPT-2's (and today's checkpoints')
    norm: str = "layernorm"  # "rmsnorm": RMSNorm in place of LayerNorm
    qk_norm: bool = False  # each head's q and k normalized (by `norm`) before the attention call
    mlp: str = "gelu"  # "relu2": relu(x)^2 in place of GELU
    zero_init_proj: bool = False  # residual output projections (and an untied head) start at zero
    tie_embeddings: bool = True  # False: the LM head has its own weight (and its own lr)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    unet_skips: bool = False  # the first half's block outputs added (learned weights) into the second half
    value_embeddings: bool = False  # per layer, a token embedding mixed into the attention values
    window: int | None = None  # sliding-window attention (attn.window): each query sees its last `window` keys

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "pick n_embd as a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"model.gelu must be 'tanh' (GPT-2's approximation) or 'exact' (erf), got {self.gelu!r}")
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"model.pos must be 'learned' (GPT-2's position table) or 'rope' (rotary), got {self.pos!r}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"model.pos=rope rotates pairs of dimensions: the head dim "
                             f"n_embd / n_head = {self.n_embd // self.n_head} must be even")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"model.rope_base must be a number > 1, got {self.rope_base!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "relu2"):
            raise ValueError(f"model.mlp must be 'gelu' (GPT-2's) or 'relu2' (relu(x)^2), got {self.mlp!r}")
        cap = self.logit_softcap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0
                                or not math.isfinite(cap)):
            raise ValueError(f"model.logit_softcap must be a number > 0 (logits = cap * tanh(logits / cap)) "
                             f"or null (no cap), got {cap!r}")
        if self.unet_skips and self.n_layer < 2:
            raise ValueError(f"model.unet_skips joins the first and second half of the blocks: it needs "
                             f"n_layer >= 2, got {self.n_layer}")
        w = self.window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= self.block_size):
            raise ValueError(f"attn.window must be an integer from 1 to model.block_size={self.block_size} "
                             f"(each query sees its last `window` keys), or null for full causal attention; got {w!r}")


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (GPT-2), or RMSNorm (Zhang & Sennrich, 2019; Llama, modded-nanogpt): no mean to
    subtract and no bias, one reduction fewer, and the re-centring was not what made the norm help."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-6)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: projections here, the attention math in ``attn_fn``."""

    def __init__(self, config: GPTConfig, attn_fn: AttnFn):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_fn = attn_fn
        # the window is passed only when set, so an attention function without the keyword keeps
        # working; asked for one, such a function is refused here rather than at the first call
        self.attn_kwargs = {}
        if config.window is not None:
            check_accepts_window(attn_fn, config.window)
            self.attn_kwargs = {"window": config.window}
        if config.qk_norm:
            # QK-norm (Dehghani et al., 2023, with LayerNorm; modded-nanogpt, with RMSNorm): q and k
            # normalized per head (by the model's ``norm``), times a learned gain, so attention
            # logits cannot grow without bound as the weights grow.
            head_dim = config.n_embd // config.n_head
            self.rms_qk = config.norm == "rmsnorm"
            norm = (lambda: nn.RMSNorm(head_dim, eps=1e-6)) if self.rms_qk else (lambda: nn.LayerNorm(head_dim, bias=False))
            self.q_norm, self.k_norm = norm(), norm()
        if config.value_embeddings:  # weights of v and of the value embedding in the mix
            self.ve_lambda = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x: torch.Tensor, rope=None, ve: torch.Tensor | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, C) -> the attention output (B, T, C) and this layer's keys and values (k, v),
        (B, H, T_past + T, D) each: ``past``'s (a KV cache's, the tokens before these) and these."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]  # views (B, T, 2, H, D) and (B, T, H, D): no copies
        if hasattr(self, "q_norm"):  # q and k normalized over D in one call, then each its own gain
            gains = torch.stack((self.q_norm.weight, self.k_norm.weight))[:, None, :]  # (2, 1, D)
            normalize = F.rms_norm if self.rms_qk else F.layer_norm
            qk = normalize(qk, qk.shape[-1:], eps=self.q_norm.eps) * gains
        if rope is not None:  # (cos, sin) of these tokens' positions, (T, D/2): q and k rotated at once
            cos, sin = rope[0][:, None, None, :], rope[1][:, None, None, :]  # broadcast over the q/k and head axes
            qk = apply_rope(qk, cos, sin)
        q, k = qk.unbind(2)
        if ve is not None:  # value embedding (B, T, C): mixed into v with two learned weights
            lam = self.ve_lambda
            v = lam[0] * v + lam[1] * ve.view(B, T, self.n_head, C // self.n_head)
        # (B, T, H, D) -> (B, H, T, D); keys are cached rotated
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past is not None:  # the earlier tokens' keys and values first
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        y = self.attn_fn(q, k, v, causal=True, **self.attn_kwargs)  # (B, H, T, D); end-aligned mask when T < T_keys
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


def check_accepts_window(attn_fn: AttnFn, window: int) -> None:
    """Raise ``kernels.UnsupportedError`` if ``attn_fn`` takes no ``window`` keyword (a user's own
    attention written before the keyword existed)."""
    try:
        params = inspect.signature(attn_fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C function): let the call decide
        return
    if not any(p.name == "window" or p.kind is p.VAR_KEYWORD for p in params):
        from kernels import UnsupportedError

        name = getattr(getattr(attn_fn, "func", attn_fn), "__name__", repr(attn_fn))
        raise UnsupportedError(f"attn.window={window}: the attention {name} takes no `window` keyword; "
                               "use attn=naive, sdpa, online or flash, or add window=None to its signature")


class GPT(nn.Module):
    """GPT-2: token (+ position) embeddings, ``n_layer`` pre-norm blocks, final LayerNorm, tied LM head.

    A block is an ``nn.ModuleDict`` (``ln_1``, ``attn``, ``ln_2``, ``mlp``: ``c_fc``, ``c_proj``)
    holding GPT-2's parameter names; what it computes is written out once, in :meth:`forward`.
    """

    def __init__(self, config: GPTConfig, attn_fn: AttnFn | None = None):
        super().__init__()
        self.config = config
        if attn_fn is None:  # the textbook implementation, imported only when no other is given
            from kernels.naive import naive_attention as attn_fn
        C, bias = config.n_embd, config.bias
        modules = dict(wte=nn.Embedding(config.vocab_size, C))
        if config.pos == "learned":  # registered second, as always: the init draws in this order
            modules["wpe"] = nn.Embedding(config.block_size, C)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([nn.ModuleDict(dict(
                ln_1=make_norm(config), attn=CausalSelfAttention(config, attn_fn), ln_2=make_norm(config),
                mlp=nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C, bias=bias), c_proj=nn.Linear(4 * C, C, bias=bias))),
            )) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        if config.value_embeddings:
            # value embeddings (modded-nanogpt): each layer's values get a token embedding of their
            # own, so token identity reaches every attention layer without passing the residual stream
            modules["ve"] = nn.ModuleList([nn.Embedding(config.vocab_size, C) for _ in range(config.n_layer)])
        self.transformer = nn.ModuleDict(modules)
        if config.pos == "rope":  # cos and sin of every position's angles, (block_size, head_dim / 2)
            cos, sin = rope_angles(torch.arange(config.block_size), C // config.n_head, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # rebuilt from the config, never saved
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf, 2017)
        # else untied (modded-nanogpt): the input table and the output head want different things
        # (an embedding per token vs a classifier), and the head gets its own lr (the "head" kind)
        if config.unet_skips:
            # U-net skips (modded-nanogpt): block i's output of the first half is added, with a learned
            # weight, to the input of block n_layer - 1 - i, a short path from early to late layers
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        for module in self.modules():  # GPT-2's init: N(0, 0.02) weights, zero biases, in module order
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth. zero_init_proj (modded-nanogpt, muP's zero readout):
        # start them at zero, so every block begins as the identity and the untied head as 0
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and config.zero_init_proj:
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init_proj and not config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default, as in GPT-2's reporting."""
        n = sum([p.numel() for p in self.parameters()])
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None, last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and the mean cross-entropy if targets given.

        ``cache``, a KV cache: a list of each layer's keys and values ``(k, v)``, (B, H, T_cached, D)
        each (``[]`` starts one). The tokens continue the cached ones (positions ``T_cached``
        onwards), and the list is updated in place to hold their keys and values too.
        ``last_only``: the logits (B, 1, V) of the last position alone, all that generation needs
        (with GPT-2's 50k-token vocabulary the head costs as much as a few blocks per position).
        """
        cfg = self.config
        B, T = idx.shape
        start = cache[0][0].shape[2] if cache else 0  # tokens already cached
        if start + T > cfg.block_size:
            raise ValueError(f"sequence length {start + T} exceeds the model's context block_size={cfg.block_size}")
        x, rope = self.transformer.wte(idx), None  # (B, T, C)
        if cfg.pos == "learned":  # positions count from the cache's first token
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        else:  # rotary: the same positions (only their offsets matter to the scores)
            rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.transformer.drop(x)
        n, half = cfg.n_layer, cfg.n_layer // 2 if cfg.unet_skips else 0
        skips, kvs = [], []  # the first half's block outputs; every layer's (k, v)
        for i, block in enumerate(self.transformer.h):
            if i >= n - half:  # second half: the mirrored first-half block's output
                x = x + self.skip_weights[n - 1 - i] * skips[n - 1 - i]
            ve = self.transformer.ve[i](idx) if cfg.value_embeddings else None
            y, kv = block.attn(block.ln_1(x), rope, ve, cache[i] if cache else None)
            x = x + y  # pre-norm residual: x + attn(ln_1(x)), then x + mlp(ln_2(x))
            h = block.mlp.c_fc(block.ln_2(x))  # (B, T, 4C)
            # ReLU^2 (So et al., 2021, Primer; modded-nanogpt): cheaper than GELU and sparse, and it
            # trained faster than GELU in Primer's search
            h = F.relu(h).square() if cfg.mlp == "relu2" else F.gelu(h, approximate="tanh" if cfg.gelu == "tanh" else "none")
            x = x + self.transformer.drop(block.mlp.c_proj(h))
            kvs.append(kv)
            if i < half:
                skips.append(x)
        if cache is not None:
            cache[:] = kvs
        logits = self.lm_head(self.transformer.ln_f(x[:, -1:] if last_only else x))  # (B, T, V)
        if cfg.logit_softcap is not None:
            # soft-capped logits (Gemma 2, modded-nanogpt): cap * tanh(logits / cap) keeps every logit
            # within +-cap, so the model cannot grow over-confident logits early in training
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        window_stride: int = 1,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); temperature 0 means greedy.

        Each token is drawn from the logits of the context window ``idx[:, start:]``: the whole
        sequence until it holds ``block_size`` tokens, then moved on ``window_stride`` tokens at a
        time, by as few steps as keep it within ``block_size`` (stride 1, the default: the last
        ``block_size`` tokens, as uncached nanoGPT does).

        ``use_cache`` keeps a KV cache, so each new token runs alone through the model, attending
        to the cached keys, instead of the whole window; the tokens are the same either way (up to
        float rounding). When the window moves, every cached position changes, so the cache is
        rebuilt from the new window: with stride 1 at every token past ``block_size`` (costing what
        uncached decoding costs), with ``block_size // 2`` once per that many tokens, every token's
        context then holding between half and all of ``block_size``. This holds for rotary
        positions too: their first-layer keys would survive a move, but every later layer's keys
        were computed from hidden states that saw the tokens the window just dropped (keeping them
        is the approximation of a rolling cache, not the sliding window).
        """
        if not (temperature >= 0 and math.isfinite(temperature)):  # also catches nan
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        block = self.config.block_size
        if isinstance(window_stride, bool) or not isinstance(window_stride, int) or not 1 <= window_stride <= block:
            raise ValueError(f"window_stride must be an integer from 1 to block_size={block}, got {window_stride!r}")
        cache, start = None, 0  # cache: the keys and values of idx[:, start:-1], filled by the first step
        for _ in range(max_new_tokens):
            over = idx.shape[1] - block  # tokens past the context: the window starts at the next stride after them
            new_start = 0 if over <= 0 else -(-over // window_stride) * window_stride
            if cache and new_start == start:
                logits, _ = self(idx[:, -1:], cache=cache)  # the one token not yet cached
            else:  # no cache, its first step, or the window moved: the whole window
                start, cache = new_start, [] if use_cache else None
                logits, _ = self(idx[:, start:], cache=cache, last_only=True)
            logits = logits[:, -1].float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

"""A GPT-2 style language model whose attention implementation is injected.

The attention block does the projections and calls ``attn_fn(q, k, v, causal=True)`` on
``(B, H, T, D)`` tensors; it never branches on which implementation it was given. Names follow
GPT-2 (``wte``, ``wpe``, ``h``, ``ln_f``, ``c_attn``, ``c_proj``) so weights are recognizable.

Generation keeps a per-layer KV cache (:class:`KVCache`): each new token runs one position
through the model and attends to the cached keys, the attention call then having fewer queries
than keys (the interface's causal mask is aligned to the end of the keys for exactly this).

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


class KVCache:
    """Keys and values of the tokens already seen, per layer, in buffers of ``block_size`` positions.

    ``length`` tokens are cached, the first of them at index ``start`` of the whole sequence;
    :meth:`GPT.forward` with a cache runs the next tokens after them and appends their keys and
    values. Positions count from the first cached token (0).
    """

    def __init__(self, n_layer: int, max_len: int, start: int = 0):
        self.max_len = max_len
        self.start = start  # where in the whole sequence the first cached token (position 0) is
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer  # (B, H, max_len, D) each, allocated on first use
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, H, T_new, D) after the cached ones; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def window_start(length: int, block_size: int, stride: int = 1) -> int:
    """Where the context window of a ``length``-token sequence starts: 0 while the sequence fits
    in ``block_size``, then moved on in steps of ``stride``, by as few steps as keep the window
    within ``block_size`` (stride 1: the last ``block_size`` tokens)."""
    over = length - block_size
    return 0 if over <= 0 else -(-over // stride) * stride


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
        self._check_components()

    def _check_components(self) -> None:
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


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """LayerNorm (GPT-2), or RMSNorm (Zhang & Sennrich, 2019; Llama, modded-nanogpt): no mean to
    subtract and no bias, one reduction fewer, and the re-centring was not what made the norm help."""
    dim = config.n_embd if dim is None else dim
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, bias=config.bias)


def check_accepts_window(attn_fn: AttnFn, window: int | None) -> None:
    """Raise ``kernels.UnsupportedError`` if a window is asked for and ``attn_fn`` takes no
    ``window`` keyword (a user's own attention written before the keyword existed)."""
    if window is None:
        return
    try:
        params = inspect.signature(attn_fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C function): let the call decide
        return
    if not any(p.name == "window" or p.kind is p.VAR_KEYWORD for p in params):
        from kernels import UnsupportedError

        name = getattr(getattr(attn_fn, "func", attn_fn), "__name__", repr(attn_fn))
        raise UnsupportedError(f"attn.window={window}: the attention {name} takes no `window` keyword; "
                               "use attn=naive, sdpa, online or flash, or add window=None to its signature")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: projections here, the attention math in ``attn_fn``."""

    def __init__(self, config: GPTConfig, attn_fn: AttnFn):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_fn = attn_fn
        # only when set: an attention function without the keyword keeps working
        self.attn_kwargs = {} if config.window is None else {"window": config.window}
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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope=None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
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
        if cache is not None:  # keys and values of the earlier tokens too: (B, H, T_cached + T, D)
            k, v = cache.append(layer, k, v)
        y = self.attn_fn(q, k, v, causal=True, **self.attn_kwargs)  # (B, H, T, D); end-aligned mask when T < T_keys
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"
        self.relu2 = config.mlp == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        # ReLU^2 (So et al., 2021, Primer; modded-nanogpt): cheaper than GELU and sparse, and it
        # trained faster than GELU in Primer's search
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate=self.approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm, or RMSNorm with ``norm="rmsnorm"``)."""

    def __init__(self, config: GPTConfig, attn_fn: AttnFn):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, attn_fn)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope=None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, rope, ve)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token (+ position) embeddings, ``n_layer`` blocks, final LayerNorm, tied LM head."""

    def __init__(self, config: GPTConfig, attn_fn: AttnFn | None = None):
        super().__init__()
        self.config = config
        if attn_fn is None:  # the textbook implementation, imported only when no other is given
            from kernels.naive import naive_attention as attn_fn
        check_accepts_window(attn_fn, config.window)
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":  # registered second, as always: the init draws in this order
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, attn_fn) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        if config.value_embeddings:
            # value embeddings (modded-nanogpt): each layer's values get a token embedding of their
            # own, so token identity reaches every attention layer without passing the residual stream
            modules["ve"] = nn.ModuleList([nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.n_layer)])
        self.transformer = nn.ModuleDict(modules)
        if config.pos == "rope":  # cos and sin of every position's angles, (block_size, head_dim / 2)
            cos, sin = rope_angles(torch.arange(config.block_size), config.n_embd // config.n_head, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # rebuilt from the config, never saved
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf, 2017)
        # else untied (modded-nanogpt): the input table and the output head want different things
        # (an embedding per token vs a classifier), and the head gets its own lr (the "head" kind)
        if config.unet_skips:
            # U-net skips (modded-nanogpt): block i's output of the first half is added, with a learned
            # weight, to the input of block n_layer - 1 - i, a short path from early to late layers
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        self.apply(self._init_weights)
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

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases (``apply`` order: the random draws' order)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default, as in GPT-2's reporting."""
        n = sum([p.numel() for p in self.parameters()])
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and the mean cross-entropy if targets given.

        With a ``cache`` the tokens continue the cached ones (positions ``cache.length`` onwards)
        and their keys and values are appended to it.
        """
        logits = self.logits(self._hidden(idx, cache))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on the final hidden states, soft-capped with ``logit_softcap`` (Gemma 2,
        modded-nanogpt): ``cap * tanh(logits / cap)`` keeps every logit within +-cap, so the model
        cannot grow over-confident logits early in training."""
        logits = self.lm_head(h)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C) for tokens ``idx`` (after the cached ones)."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence length {start + T} exceeds the model's context block_size={self.config.block_size}"
            )
        x, rope = self.transformer.wte(idx), None  # (B, T, C)
        if self.config.pos == "learned":  # positions count from the cache's first token
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        else:  # rotary: the same positions (only their offsets matter to the scores)
            rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.transformer.drop(x)
        ves = [ve(idx) for ve in self.transformer.ve] if self.config.value_embeddings else [None] * self.config.n_layer
        skips, half = [], self.config.n_layer // 2 if self.config.unet_skips else 0
        for layer, block in enumerate(self.transformer.h):
            if layer >= self.config.n_layer - half:  # second half: the mirrored first-half block's output
                x = x + self.skip_weights[self.config.n_layer - 1 - layer] * skips[self.config.n_layer - 1 - layer]
            x = block(x, cache, layer, rope, ves[layer])
            if layer < half:
                skips.append(x)
        if cache is not None:
            cache.length = start + T
        return self.transformer.ln_f(x)

    def _next_logits(
        self, idx: torch.Tensor, cache: KVCache | None, use_cache: bool, window_stride: int = 1
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Logits (B, V) for the token after ``idx``, seeing the context window ``idx[:, start:]``.

        The window is the whole sequence until it reaches ``block_size`` tokens; then its start
        moves ``window_stride`` tokens at a time (:func:`window_start`). With a cache only the
        newest token runs through the model while the start stays put. Positions are learned
        absolute embeddings, so when the start moves every cached position changes: the cache is
        rebuilt from the new window. With stride 1 (the exact sliding window) that happens at
        every token past ``block_size`` and costs what uncached decoding costs; with a stride of
        ``block_size // 2``, once per that many tokens. This holds for rotary positions too: their
        first-layer keys would survive a move, but every later layer's keys were computed from
        hidden states that saw the tokens the window just dropped (keeping them instead is the
        approximation of a rolling cache, not the sliding window). Cached and uncached decoding
        see the same windows, so they give the same tokens for any stride.
        """
        start = window_start(idx.shape[1], self.config.block_size, window_stride)
        if not use_cache:
            return self.logits(self._hidden(idx[:, start:])[:, -1]), None
        if cache is not None and cache.start == start and cache.start + cache.length == idx.shape[1] - 1:
            new = idx[:, -1:]  # the one token not yet cached
        else:  # first call, or the window moved: (re)fill the cache from the window
            cache, new = KVCache(self.config.n_layer, self.config.block_size, start), idx[:, start:]
        return self.logits(self._hidden(new, cache)[:, -1]), cache

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

        ``use_cache`` keeps a KV cache, so each new token costs one position's forward pass instead
        of the whole context's; the tokens are the same either way (up to float rounding).
        Past ``block_size`` tokens the context window moves ``window_stride`` tokens at a time:
        1 (default) slides it every token, as uncached nanoGPT does, and the cache must then be
        rebuilt every token; ``block_size // 2`` keeps every token's context between half and all
        of ``block_size`` and lets the cache serve all but one token in ``window_stride``.
        """
        if not (temperature >= 0 and math.isfinite(temperature)):  # also catches nan
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        block = self.config.block_size
        if isinstance(window_stride, bool) or not isinstance(window_stride, int) or not 1 <= window_stride <= block:
            raise ValueError(f"window_stride must be an integer from 1 to block_size={block}, got {window_stride!r}")
        cache = None  # the first step fills it from the prompt
        for _ in range(max_new_tokens):
            logits, cache = self._next_logits(idx, cache, use_cache, window_stride)
            logits = logits.float()
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

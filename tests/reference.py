"""The one float64 attention reference every attention test compares against.

``softmax(q k^T * scale + mask) v`` computed in float64. The causal mask is aligned to the END of
the keys, as in FlashAttention's interface: query ``i`` of ``Tq`` sees keys ``j <= i + (Tk - Tq)``.
With ``Tq == Tk`` that is the usual lower-triangular mask; with a KV cache (``Tq < Tk``) the new
queries see the whole cache. A query row that sees no key at all (only possible when ``Tq > Tk``)
outputs zeros and has ``lse = -inf``, as FlashAttention does. A sliding ``window`` keeps, of the
keys a query sees, the last ``window``: ``i + (Tk - Tq) - window < j``.
"""
from __future__ import annotations

import torch


def causal_mask(tq: int, tk: int, device=None, window: int | None = None) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where query i may attend key j (end-aligned, within the window)."""
    mask = torch.zeros(tq, tk, dtype=torch.bool, device=device)
    for i in range(tq):  # one row at a time, as the definition reads
        pos = i + (tk - tq)  # the query's position among the keys
        lo = 0 if window is None else max(0, pos - window + 1)
        if pos >= 0:
            mask[i, lo:pos + 1] = True
    return mask


def attention_f64(q, k, v, causal: bool = True, scale: float | None = None, return_lse: bool = False,
                  window: int | None = None):
    """Reference attention on (B, H, T, D) tensors, in float64 (differentiable)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device, window), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq); -inf on rows with no key
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float64).min))
    p = torch.nan_to_num(p, nan=0.0)  # rows with no key: exp(-inf - (-inf)) -> 0
    out = p @ v
    return (out, lse) if return_lse else out


def gpt_logits_f64(model, idx):
    """The logits of a ``models.GPT`` for tokens ``idx`` (B, T), recomputed in float64 from its
    weights (state dict) and config with every component written out from its definition."""
    import math

    cfg, P = model.config, {k: v.double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    C, H = cfg.n_embd, cfg.n_head
    D = C // H

    def rms(x, weight):  # x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich, 2019)
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight

    def layer_norm(x, weight):  # (x - mean) / sqrt(var + eps) * g (Ba et al., 2016)
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * weight

    def norm(x, name):
        if cfg.norm == "rmsnorm":
            return rms(x, P[f"{name}.weight"])
        y = layer_norm(x, P[f"{name}.weight"])
        return y + P[f"{name}.bias"] if f"{name}.bias" in P else y

    def linear(x, name):
        y = x @ P[f"{name}.weight"].T
        return y + P[f"{name}.bias"] if f"{name}.bias" in P else y

    def rotate(x):  # (B, T, H, D): pair (i, i + D/2) of position t turned by t * base^(-2i/D)
        half = D // 2
        theta = torch.arange(T, dtype=torch.float64)[:, None] * cfg.rope_base ** (-2 * torch.arange(half, dtype=torch.float64) / D)
        cos, sin = torch.cos(theta)[None, :, None, :], torch.sin(theta)[None, :, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def act(h):
        if cfg.mlp == "relu2":
            return torch.clamp(h, min=0) ** 2
        if cfg.gelu == "exact":
            return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    x = P["transformer.wte.weight"][idx]
    if cfg.pos == "learned":
        x = x + P["transformer.wpe.weight"][:T]
    half_layers = cfg.n_layer // 2 if cfg.unet_skips else 0
    outputs = []  # each block's output
    for layer in range(cfg.n_layer):
        pre = f"transformer.h.{layer}"
        mirror = cfg.n_layer - 1 - layer  # U-net: the first-half block whose output joins this one
        if mirror < half_layers:
            x = x + P["skip_weights"][mirror] * outputs[mirror]
        q, k, v = linear(norm(x, f"{pre}.ln_1"), f"{pre}.attn.c_attn").view(B, T, 3, H, D).unbind(2)
        if cfg.qk_norm and cfg.norm == "rmsnorm":
            q, k = rms(q, P[f"{pre}.attn.q_norm.weight"]), rms(k, P[f"{pre}.attn.k_norm.weight"])
        elif cfg.qk_norm:  # LayerNorm without a bias
            q, k = layer_norm(q, P[f"{pre}.attn.q_norm.weight"]), layer_norm(k, P[f"{pre}.attn.k_norm.weight"])
        if cfg.value_embeddings:
            lam = P[f"{pre}.attn.ve_lambda"]
            v = lam[0] * v + lam[1] * P[f"transformer.ve.{layer}.weight"][idx].view(B, T, H, D)
        if cfg.pos == "rope":
            q, k = rotate(q), rotate(k)
        y = attention_f64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window=cfg.window)
        x = x + linear(y.transpose(1, 2).reshape(B, T, C), f"{pre}.attn.c_proj")
        x = x + linear(act(linear(norm(x, f"{pre}.ln_2"), f"{pre}.mlp.c_fc")), f"{pre}.mlp.c_proj")
        outputs.append(x)
    logits = norm(x, "transformer.ln_f") @ P["lm_head.weight"].T
    cap = cfg.logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)

"""The torch.optim plumbing every optimizer here shares, written once.

An optimizer in this package is its update rule. A subclass declares

* ``RANGES``: the allowed range of each hyperparameter (checked for every parameter group);
* ``init_state(p, group)``: the per-parameter state, made on the parameter's first step, under
  torch's names so that state dicts are interchangeable with torch.optim's;
* ``update(p, grad, state, **hyperparameters)``: one parameter's step, written as the paper reads.

and, only where scripts/bench/bench_optim.py shows it pays, a fast path (``update_foreach`` and
``update_fused``, beside the rule in its file). This class does the rest: parameter groups and
their checks, lazy state, the closure, gradient checks, choosing the path from ``foreach``/``fused``
(as torch.optim's functional ``adam()`` picks ``_single_tensor_adam`` or ``_multi_tensor_adam``),
and a state_dict round trip that keeps the receiving optimizer's path and its step counters on the host.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

# Group keys that choose how a step runs, not what it computes.
PATH_KEYS = ("foreach", "fused", "capturable", "differentiable")

# Allowed ranges: (low, high, high is open, None allowed); low <= value <= high (< when open),
# element-wise for a tuple such as betas.
NON_NEGATIVE = (0.0, math.inf, False, False)
UNIT_INTERVAL = (0.0, 1.0, True, False)  # [0, 1): momentum-like coefficients (betas)

# torch.optim's wording for the common ones, so messages read the same as torch's
LABELS = {"lr": "learning rate", "eps": "epsilon value", "betas": "beta parameter",
          "weight_decay": "weight_decay value", "momentum": "momentum value"}

# Storage dtypes the fused Triton kernels handle (their math is fp32; float64 would lose precision).
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per piece when a CPU foreach update is run piece by piece (see ``cpu_pieces``).
CPU_PIECE_NUMEL = 1 << 18


def new_step() -> Tensor:
    """The per-parameter step counter: a CPU scalar tensor, as torch.optim keeps it (float32, or
    float64 under a float64 default dtype). On the host so that reading it never syncs a GPU."""
    return torch.tensor(0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` defined by its update rule (see the module docstring)."""

    RANGES: ClassVar[dict[str, tuple]] = {}
    allow_complex: ClassVar[bool] = False
    # set by subclasses that have them; the plain ``update`` is always the reference
    update_foreach: ClassVar[Callable[..., None] | None] = None
    update_fused: ClassVar[Callable[..., None] | None] = None
    fused_unsupported: ClassVar[tuple[str, ...]] = ()  # group flags the fused kernel cannot do

    @staticmethod
    def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {}

    @staticmethod
    def update(p: Tensor, grad: Tensor, state: dict[str, Tensor], **hyperparameters: Any) -> None:
        raise NotImplementedError

    # --- groups and their checks

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (which may override the defaults) and check its hyperparameters against
        ``RANGES``, in torch.optim's words, and its path flags."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, value in group.items():  # tuples: a Hydra ListConfig in a state dict fails weights_only loads
            if key != "params" and (isinstance(value, list) or type(value).__name__ == "ListConfig"):
                group[key] = tuple(value)
        for key, (low, high, high_open, optional) in self.RANGES.items():
            value = group[key]
            for v in value if isinstance(value, tuple) else (value,):
                if v is None and optional:
                    continue
                number = isinstance(v, (int, float, Tensor)) and not isinstance(v, bool)
                x = (v.item() if isinstance(v, Tensor) else float(v)) if number else math.nan
                if not (low <= x and (x < high if high_open else x <= high)):  # False for NaN
                    bounds = [f">= {low:g}"] if low > -math.inf else []
                    if high < math.inf:
                        bounds.append(f"{'<' if high_open else '<='} {high:g}")
                    raise ValueError(f"Invalid {LABELS.get(key, key)}: {key}={value!r} "
                                     f"(must be {' and '.join(bounds) or 'a number'})")
        for key in ("foreach", "fused"):
            if group.get(key) not in (None, True, False):
                raise ValueError(f"Invalid {key} value: {key}={group[key]!r} (must be None, True or False)")
        for key in ("capturable", "differentiable"):
            if group.get(key):
                raise ValueError(
                    f"{key}={group[key]!r} is not supported by gptlab's optimizers (trainer.optim); "
                    f"leave {key}=False or use torch.optim"
                )
        if group.get("fused"):
            self.check_fused(group)

    def check_fused(self, group: dict[str, Any]) -> None:
        """What the fused Triton step cannot do raises, naming the argument: nothing falls back silently."""
        name = type(self).__name__
        if self.update_fused is None:
            raise ValueError(f"{name}(fused=True) is not implemented in gptlab's optimizers; use foreach=True")
        if group["foreach"]:
            raise ValueError(f"{name}: fused=True and foreach=True cannot be used together; pick one")
        for key in self.fused_unsupported:
            if group.get(key):
                raise ValueError(f"{name}(fused=True) does not support {key}=True; use foreach=True")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # read now, not at import
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(f"{name}(fused=True) does not support complex parameters; use foreach=True")
            if p.dtype not in FUSED_DTYPES:
                raise ValueError(f"{name}(fused=True) supports float32, float16 and bfloat16 parameters, "
                                 f"got {p.dtype}; use foreach=True")
            if p.device.type != "cuda" and not (interpreted and p.device.type == "cpu"):
                raise ValueError(
                    f"{name}(fused=True) needs a CUDA device (Triton kernel), got a parameter on {p.device}; "
                    "use foreach=True (or TRITON_INTERPRET=1 to run the kernel interpreted on CPU)"
                )
        if importlib.util.find_spec("triton") is None:
            raise ValueError(f"{name}(fused=True) needs Triton installed (pip install triton); use foreach=True")

    # --- the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Each group's parameters that have a gradient are gathered with their gradients and state
        (made on first use) per (device, dtype), since a foreach op takes tensors of one of each,
        then each bucket is stepped on the path the group's flags choose."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for group in self.param_groups:
            buckets: dict[tuple, tuple[list, list, list]] = {}
            plain = True  # plain tensors only (subclasses such as DTensor may lack foreach kernels)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:  # the update rules here are dense
                    raise RuntimeError(f"{name} does not support sparse gradients; use torch.optim.SparseAdam, "
                                       "or dense gradients (e.g. nn.Embedding(..., sparse=False))")
                if torch.is_complex(p) and not self.allow_complex:
                    raise RuntimeError(f"{name} does not support complex parameters")
                state = self.state[p]
                if not state:
                    state.update(self.init_state(p, group))
                params, grads, states = buckets.setdefault((p.device, p.dtype), ([], [], []))
                params.append(p)
                grads.append(p.grad)
                states.append(state)
                plain = plain and type(p) in (Tensor, torch.nn.Parameter)
            # the group's values of this optimizer's own keys; a tensor lr is read as a float
            hp = {k: group[k].item() if isinstance(group[k], Tensor) else group[k]
                  for k in self.defaults if k not in PATH_KEYS}
            for params, grads, states in buckets.values():
                self.update_group(group, hp, params, grads, states, plain)
        return loss

    def update_group(self, group: dict[str, Any], hp: dict[str, Any], params: list[Tensor],
                     grads: list[Tensor], states: list[dict], plain: bool) -> None:
        """Step one (device, dtype) bucket of a group, whose hyperparameters are ``hp``, on the
        path its flags choose.

        ``foreach=None`` is resolved here. torch.optim only defaults to foreach on CUDA; we default
        to it on CPU as well: the foreach ops loop in C++, so they save the per-tensor Python dispatch
        of the single-tensor path, and with ``cpu_pieces`` they also keep the buffers in cache
        (scripts/bench/bench_optim.py, 1 thread: our foreach AdamW takes ~0.5x the single-tensor
        time on nano, ~0.35x on gpt2) -- for ``plain`` tensors only."""
        foreach = group.get("foreach")
        if group.get("fused"):
            self.check_fused(group)  # again: a loaded state dict brings its own flags
            self.update_fused(params, grads, states, **hp)
        elif self.update_foreach is not None and (plain if foreach is None else foreach):
            self.update_foreach(params, grads, states, **hp)
        else:
            for p, g, state in zip(params, grads, states):
                self.update(p, g, state, **hp)

    # --- state dicts

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved before a path key existed get its default
            for key in PATH_KEYS:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key] if key in ("foreach", "fused") else False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, except that this optimizer keeps its own path flags and host step counters.

        torch takes every group key from the saved dict, so a checkpoint written by a fused (GPU)
        run would switch a foreach (CPU) run to the Triton kernels; all paths share one state
        layout, so the receiving optimizer's flags are kept. torch also leaves ``step`` wherever
        the checkpoint was mapped (on the GPU with ``map_location="cuda"``, or moved there for a
        saved fused group); the update reads it with ``.item()`` per parameter, so it is brought
        back to the CPU here: no host sync per parameter per step.
        """
        kept = [{k: g[k] for k in PATH_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flags in zip(self.param_groups, kept):
            group.update(flags)
        for state in self.state.values():
            step = state.get("step")
            if isinstance(step, Tensor) and step.device.type != "cpu":
                state["step"] = torch.tensor(step.item(), dtype=step.dtype)  # one read, at load time


# --- what every foreach step shares ----------------------------------------------------------

def cpu_pieces(tensor_lists: list[list[Tensor]], piece_numel: int | None = None):
    """Yield ``(lists of views, owner index per view)`` covering ``tensor_lists`` in small pieces.

    Why: on CPU a foreach op is a C++ loop of ordinary kernels, so an update of k ops streams every
    buffer through DRAM k times and allocates its temporaries for the whole model at once. Running
    all k ops on a piece of ~256K elements keeps the piece's buffers in cache between ops and its
    temporaries small enough to be reused by the allocator. Large contiguous tensors are split
    into flat views; small ones are packed together. Elementwise math is unchanged, so results are
    bit-identical. One piece when the buffers fit in cache anyway (a few pieces' worth: more
    foreach calls would only add overhead), and on CUDA, where foreach kernels already fuse.
    """
    piece_numel = piece_numel or CPU_PIECE_NUMEL
    first = tensor_lists[0]
    if not first or first[0].device.type != "cpu" or sum([t.numel() for t in first]) <= 4 * piece_numel:
        yield tensor_lists, list(range(len(first)))
        return
    lists: list[list[Tensor]] = [[] for _ in tensor_lists]
    owners: list[int] = []
    filled = 0
    for i in range(len(first)):
        tensors = [tl[i] for tl in tensor_lists]
        numel = tensors[0].numel()
        if numel > piece_numel and all(t.is_contiguous() for t in tensors):
            flats = [t.view(-1) for t in tensors]
            for start in range(0, numel, piece_numel):
                yield [[f[start : start + piece_numel]] for f in flats], [i]
            continue
        if filled + numel > piece_numel and owners:
            yield lists, owners
            lists, owners, filled = [[] for _ in tensor_lists], [], 0
        for out, t in zip(lists, tensors):
            out.append(t)
        owners.append(i)
        filled += numel
    if owners:
        yield lists, owners

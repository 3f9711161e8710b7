"""Learning-rate schedules and Adam, dense and row-sparse, with optax's update rule.

Adam here is exactly ``optax.adam`` (eps outside the square root, eps_root = 0, bias correction
with the global step). The row-sparse variant updates only the rows that received gradient in
this step: their moments and parameters move exactly as dense Adam would move them, while
untouched rows keep their moments and parameters frozen (dense Adam would decay their moments
and keep moving them by the momentum left over from earlier steps). That is the "lazy Adam"
rule; it saves the O(n * d) pass over every row when few rows are touched.
"""
from __future__ import annotations

import math

import torch
from torch.optim.adam import adam as functional_adam


def learning_rate(step: int, total_steps: int, peak: float, warmup: int, decay: str, decay_start: float) -> float:
    """LR at ``step`` (0-based): linear warmup over ``warmup`` steps, then constant, linear or
    cosine decay to zero over the last ``1 - decay_start`` of ``total_steps``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant" or total_steps <= 0:
        return peak
    start = max(int(decay_start * total_steps), warmup)
    if step < start:
        return peak
    progress = min(1.0, (step - start) / max(total_steps - start, 1))
    if decay == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class Adam:
    """Adam over named fp32 tensors; moments live beside the parameters (same device).

    ``step`` takes dense gradients for several parameters at once; ``step_rows`` takes
    row-sparse ones for an ``[n, ...]`` parameter (rows unique). Both count the same global step
    for bias correction. The update is torch's fused Adam kernel, through its public functional
    entry ``torch.optim.adam.adam``
    (``fused=True``).
    """

    def __init__(self, params: dict[str, torch.Tensor], b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.params = params
        self.b1, self.b2, self.eps = b1, b2, eps
        self.m = {name: torch.zeros_like(p) for name, p in params.items()}
        self.v = {name: torch.zeros_like(p) for name, p in params.items()}
        self.count = 0  # completed steps, as optax's ScaleByAdamState.count

    def begin_step(self) -> None:
        """Advance the shared step counter once per optimisation step."""
        self.count += 1

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor],
                v: list[torch.Tensor], lr: float) -> None:
        """One fused pass over each tensor, at the shared step ``count``."""
        # The functional API advances each step tensor before using it: hand it count - 1.
        steps = [torch.tensor(float(self.count - 1), device=p.device) for p in params]
        functional_adam(
            params, grads, m, v, [], steps, fused=True,
            amsgrad=False, beta1=self.b1, beta2=self.b2, lr=lr, weight_decay=0.0, eps=self.eps, maximize=False,
        )

    def step(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        """Dense update of each named parameter with its gradient (same shape)."""
        names = list(grads)
        self._update([self.params[n] for n in names], [grads[n].contiguous() for n in names],
                     [self.m[n] for n in names], [self.v[n] for n in names], lr)

    def step_rows(self, name: str, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Update only ``rows`` of parameter ``name``; grad: [U, ...] for those rows."""
        # Hand-written: no kept optimizer library updates a row subset and leaves the rest's moments alone.
        p, m, v = self.params[name], self.m[name], self.v[name]
        p_rows, m_rows, v_rows = p[rows], m[rows], v[rows]
        self._update([p_rows], [grad.contiguous()], [m_rows], [v_rows], lr)
        p.index_copy_(0, rows, p_rows)
        m.index_copy_(0, rows, m_rows)
        v.index_copy_(0, rows, v_rows)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"adam.m.{name}": t for name, t in self.m.items()}
        out.update({f"adam.v.{name}": t for name, t in self.v.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        for name in self.params:
            self.m[name].copy_(tensors[f"adam.m.{name}"])
            self.v[name].copy_(tensors[f"adam.v.{name}"])
        self.count = count

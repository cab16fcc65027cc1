"""The one training loop of tuning (edgevlm.train.tune) and the demo's pretraining (edgevlm.train.demo):
AdamW, a learning rate warmed up then decayed, gradient clipping, and a stop with one line when the loss, the
gradients or the weights go non-finite. The caller gives the loss of each step and a hook run after it (its
progress lines, validation, checkpoints, an early stop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import EdgeVLMError


def adamw(params: list, lr: float, betas: tuple[float, float] = (0.9, 0.98)):
    """AdamW with weight decay 0.01 over `params` (a list: `run` clips and checks the same ones)."""
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=betas)


@dataclass(frozen=True)
class Schedule:
    """The learning rate at each step (from 0) of a run of `steps`: a linear warmup over `warmup` steps, then
    `decay` down to `floor` times `lr`: "cosine" over the steps after the warmup (tuning), "linear" over all
    the steps, multiplied into the warmup (vision pretraining), or None, `lr` after the warmup (copy
    pretraining). Each form keeps its caller's arithmetic, so a run gets the same floats as before it was shared.
    """

    lr: float
    steps: int
    warmup: int
    decay: str | None = "cosine"
    floor: float = 0.1

    def __call__(self, step: int) -> float:
        lr, warmup = self.lr, self.warmup
        if self.decay == "cosine":
            if step < warmup:
                return lr * (step + 1) / warmup
            cosine = 1 + math.cos(math.pi * (step - warmup) / max(1, self.steps - warmup))
            return lr * (self.floor + (1 - self.floor) / 2 * cosine)
        rate = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        if self.decay == "linear":
            rate *= self.floor + (1 - self.floor) * (1 - step / self.steps)
        return rate


def diverged(what: str, where: str, lr: float, out: Path) -> EdgeVLMError:
    """The one-line error of a training run whose loss, gradients or weights went non-finite (`what`) at `where`
    (a step); raised before anything is saved, so `out` is as it was."""
    return EdgeVLMError(f"training diverged: {what} at {where}; lower the learning rate (it was {lr:g}) and train "
                        f"again ({out} is unchanged)")


def run(params: list, optimizer, loss_of, schedule: Schedule, *, out: Path, start: int = 0, clip: float | None = 1.0,
        check_gradients: bool = True, name: str = "step", on_step=None) -> None:
    """Train from step `start` to `schedule.steps`. Each step sets the learning rate, takes `loss_of(step)` (which
    draws its batch, so a caller's random draws keep their order), backpropagates, clips the gradients of `params`
    to norm `clip` (None: no clipping) and steps. `on_step(done, loss)` follows each step (`done` counts from 1,
    `loss` is a float); when it returns True the run ends there.

    A non-finite loss or gradient norm stops the run before the step that would apply it, and non-finite weights
    at the end (a last step can overflow what the loss never saw), with `diverged` naming f"{name} {done}/{steps}":
    trained on, NaN weights would be checkpointed and saved over `out`. Without `check_gradients`, non-finite
    gradients are stepped on and the next step's loss names the divergence (copy pretraining's report)."""
    import torch

    steps, where = schedule.steps, f"{name} {start}/{schedule.steps}"
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        loss = loss_of(step)
        where = f"{name} {step + 1}/{steps}"
        if not torch.isfinite(loss):
            raise diverged(f"the loss is {loss.item()}", where, schedule.lr, out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if check_gradients and not torch.isfinite(norm):
                raise diverged("the gradients are not finite", where, schedule.lr, out)
        optimizer.step()
        if on_step and on_step(step + 1, loss.item()):
            break
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise diverged("the weights are not finite", where, schedule.lr, out)

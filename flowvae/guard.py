"""The non-finite guard: no NaN or infinity ever reaches the weights.

A step whose loss or gradient norm is not finite is skipped (the schedule still advances), and
``max_bad_steps`` such steps in a row stop the run. Two strategies, one behaviour:

- sync (CPU, or any non-fused optimizer): one host sync per step decides before the update.
- deferred (CUDA with a fused optimizer): a sync per step would stop the host from queueing the
  next step while the GPU works. The fused optimizer skips its own update on the device when
  ``found_inf`` is 1, and the host looks every ``check_every`` steps.

Both skip the same updates (tested on the CPU by forcing the deferred strategy).
"""

from __future__ import annotations

import torch

from flowvae.errors import TrainingError


def uses_deferred(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    return device.type == "cuda" and bool(optimizer.defaults.get("fused"))


class NonFiniteGuard:
    def __init__(self, max_bad_steps: int, check_every: int, deferred: bool, device) -> None:
        self.max_bad, self.check_every, self.deferred = max_bad_steps, check_every, deferred
        self.in_a_row = 0  # sync: the current run of skipped steps
        self.run = torch.zeros((), device=device)  # deferred: the same, on the device
        self.window = torch.zeros((), device=device)  # deferred: skips since the last look
        self.seen = 0  # the run of skipped steps at the last observation

    def step(self, optimizer: torch.optim.Optimizer, value: torch.Tensor) -> bool | None:
        """optimizer.step() unless ``value`` (loss + gradient norm) is non-finite. Returns whether
        the update ran, or None where that is known on the device only (deferred)."""
        if self.deferred:
            nonfinite = (~torch.isfinite(value)).float()
            optimizer.found_inf = nonfinite
            optimizer.step()
            self.run = (self.run + nonfinite) * nonfinite
            self.window += nonfinite
            return None
        ok = bool(torch.isfinite(value))
        if ok:
            optimizer.step()
        self.in_a_row = 0 if ok else self.in_a_row + 1
        return ok

    def observe(self, step: int, ok: bool | None, last: bool) -> str | None:
        """A warning to show after ``step``, or None. ``last``: the run stops after this step,
        so the deferred strategy looks now."""
        if not self.deferred:
            self.seen = self.in_a_row
            if ok or self.in_a_row > 1:  # said once per run of bad steps, not once per step
                return None
            return (
                f"non-finite loss or gradient at step {step}, update skipped "
                f"({self.in_a_row}/{self.max_bad} in a row); the run stops after "
                f"{self.max_bad} in a row, and skipped steps in a row are not listed one by one"
            )
        if step % self.check_every and not last:
            return None
        skipped, self.seen = int(self.window), int(self.run)
        self.window.zero_()
        if not skipped:
            return None
        return (
            f"{skipped} non-finite loss or gradient step(s) up to step {step}, updates skipped "
            f"({self.seen}/{self.max_bad} in a row)"
        )

    def stop_if_stuck(self, step: int) -> None:
        """Raise once the last observation saw max_bad_steps skipped steps in a row."""
        if self.seen >= self.max_bad:
            raise TooManyBadSteps(self.seen, step, self.max_bad)


class TooManyBadSteps(TrainingError):
    def __init__(self, in_a_row: int, step: int, limit: int) -> None:
        self.in_a_row, self.step, self.limit = in_a_row, step, limit
        super().__init__(
            f"{in_a_row} non-finite steps in a row at step {step} (train.max_bad_steps = {limit}) "
            "— lower train.lr, set train.grad_clip, or check the data"
        )

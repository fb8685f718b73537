"""Memory a run asks for: a batch that cannot fit is said before training, in one line naming
the key and the amount, instead of torch's allocation error minutes later."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from flowvae.errors import ConfigError, FlowvaeError

_ASKED = (
    re.compile(r"tried to allocate (\d+) bytes", re.IGNORECASE),  # CPU allocator
    re.compile(r"Tried to allocate ([\d.]+ [KMGT]i?B)"),  # CUDA caching allocator
)


class OutOfMemory(FlowvaeError):
    """An allocation failed: one line naming what to lower."""


def human(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text
    )


def asked(exc: BaseException) -> str | None:
    """The size of the failed allocation, as its message says it."""
    for pattern in _ASKED:
        m = pattern.search(str(exc))
        if m:
            return human(int(m[1])) if m[1].isdigit() else m[1]
    return None


def out_of_memory(exc: BaseException, what: str) -> OutOfMemory:
    """One line for a failed allocation: ``what`` names the key or option to lower."""
    size = asked(exc)
    return OutOfMemory(
        "out of memory"
        + (f" (an allocation of {size} failed)" if size else "")
        + f" — lower {what}"
    )


def available(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where that is not known)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def saved_bytes_per_row(experiment, rows: int = 32) -> float:
    """Bytes that one training row keeps for the backward pass, measured on a small batch: the
    tensors autograd saves (a lower bound on what the update needs). The probe draws from a
    forked RNG, so the run's random stream is untouched."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        seen[key] = t.numel() * t.element_size()
        return t

    devices = [experiment.device] if experiment.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        batch = experiment.batch(rows)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            experiment.loss(experiment.model, batch, 1.0)
    data = sum(t.numel() * t.element_size() for t in batch)
    return (sum(seen.values()) + data) / rows


#: Batches up to this many rows are taken to fit without the probe's extra forward pass (a
#: failed allocation later is still one line).
PROBE_ABOVE = 4096


def check_batch_fits(experiment, batch_size: int, device: torch.device) -> None:
    """Refuse a train.batch_size whose update cannot fit in the memory left on ``device``."""
    free = available(device)
    if free is None or batch_size <= PROBE_ABOVE:
        return
    need = saved_bytes_per_row(experiment) * batch_size
    if need > free:
        raise ConfigError(
            f"train.batch_size = {batch_size:,} needs at least {human(need)} for one update, "
            f"more than the {human(free)} available on {device.type} — lower train.batch_size"
        )

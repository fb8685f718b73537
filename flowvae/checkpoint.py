"""Checkpoints: written atomically (temp file, fsync, rename), read with ``weights_only=True``.

A checkpoint holds the model and optimiser state, the step, the RNG states, the resolved config,
the best validation score so far and the package version, under a schema number.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from flowvae import __version__
from flowvae.errors import CheckpointError

SCHEMA = 1
REQUIRED = ("schema", "model", "step", "config")


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync it, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def make_checkpoint(**fields: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "version": __version__, **fields}


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a flowvae checkpoint safely; every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist — pass a file like runs/NAME/checkpoints/best.pt"
        )
    if path.is_dir():
        hint = path / "checkpoints" / "best.pt"
        raise CheckpointError(
            f"{path} is a folder — pass a checkpoint file"
            + (f" such as {hint}" if hint.exists() else "")
        )
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4" for a stray file
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # garbage makes the unpickler raise IndexError, KeyError, ...
        reason = _reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in reason:
            raise CheckpointError(
                f"refusing to load {path}: it is not a plain-tensor checkpoint ({reason}); "
                "flowvae loads checkpoints with weights_only=True"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable flowvae checkpoint (truncated or not a checkpoint: {reason})"
        ) from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED):
        raise CheckpointError(
            f"{path} is a torch file but not a flowvae checkpoint (missing model/config/step)"
        )
    schema = ckpt.get("schema")
    if schema != SCHEMA:
        raise CheckpointError(
            f"{path} has checkpoint schema {schema!r} (flowvae {ckpt.get('version', '?')}); this flowvae "
            f"{__version__} reads schema {SCHEMA} — use the flowvae version that wrote it"
        )
    return ckpt


def _reason(exc: Exception) -> str:
    """The informative line of a torch.load error (not the weights_only boilerplate around it)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    first = (useful or lines or [type(exc).__name__])[0]
    return first.split(". ", 1)[0].removesuffix(".")[:160]  # first sentence

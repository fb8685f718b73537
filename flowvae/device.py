"""Turn the config's device string into a torch.device, with a clear error when CUDA is absent."""

from __future__ import annotations

import torch

from flowvae.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: cuda was requested but no CUDA device is available — use --device cpu or device: auto"
        )
    return torch.device(name)

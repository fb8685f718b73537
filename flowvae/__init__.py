"""flowvae: variational inference with normalizing flows.

``flowvae.load(path)`` returns a trained run's model and ``flowvae.train(config, out=...)``
trains one (flowvae.api; docs/api.md).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import flowvae` (and the CLI's start) does not import torch.
    if name == "load":
        from flowvae.api import load

        return load
    if name == "train":  # the module flowvae.train, which is callable (it runs api.train)
        import importlib

        return importlib.import_module("flowvae.train")
    raise AttributeError(f"module 'flowvae' has no attribute {name!r}")

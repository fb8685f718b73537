"""The flow registry: adding a family is one new module plus ``@FLOWS.register(name)``."""

from flowvae.registry import Registry

FLOWS: Registry = Registry("flow")

"""The flow registry: adding a family is one new module plus ``@FLOWS.register(name)``, or a
class outside the package named by ``module:Class`` / ``file.py:Class`` / an entry point of
the group ``flowvae.flows`` (flowvae.plugins)."""

from flowvae.plugins import PluginSource
from flowvae.registry import Registry


def _check_flow(obj: object) -> str | None:
    from flowvae.flows.base import Flow

    if isinstance(obj, type) and issubclass(obj, Flow):
        return None
    return "is not a subclass of flowvae.flows.Flow"


FLOWS: Registry = Registry("flow", plugins=PluginSource("flow", "flowvae.flows", _check_flow))

"""What can be run, by name, without importing it (no torch): the experiments.

Each name resolves to its module on first use (flowvae.registry), so the config can check
``experiment`` and ask the experiment to check the rest while ``import flowvae.config`` stays
light.
"""

from __future__ import annotations

from flowvae.registry import Registry

__all__ = ["DEFAULT_EXPERIMENT", "EXPERIMENTS"]

#: name -> the experiment's class (flowvae.experiments.base.Experiment), registered by its module
EXPERIMENTS: Registry = Registry(
    "experiment",
    modules={"density": "flowvae.experiments.density", "vae": "flowvae.experiments.vae"},
)

#: What a config without an ``experiment`` key fits.
DEFAULT_EXPERIMENT = "density"

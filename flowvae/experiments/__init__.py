"""What is being fitted, one module per experiment, each registered in ``EXPERIMENTS`` on import.

- ``density``: q_K = flow(q_0) against an unnormalised 2-D energy (the paper's Figure 3).
- ``vae``: a deep latent Gaussian model with an amortised flow posterior (the paper's Table 2).
"""

from flowvae.catalog import DEFAULT_EXPERIMENT, EXPERIMENTS
from flowvae.experiments import density, vae  # noqa: F401  (registration)
from flowvae.experiments.base import (
    EvalOptions,
    Experiment,
    ReportOptions,
    SampleOptions,
    anneal_beta,
    gaussian_log_prob,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "EXPERIMENTS",
    "EvalOptions",
    "Experiment",
    "ReportOptions",
    "SampleOptions",
    "anneal_beta",
    "build",
    "gaussian_log_prob",
]


def build(cfg, device) -> Experiment:
    """The experiment ``cfg.experiment`` names, with its model on ``device``."""
    return EXPERIMENTS.get(cfg.experiment)(cfg, device)

"""Unnormalised 2-D target densities for the density-matching experiment."""

from flowvae.targets.energies import TARGETS, Target, log_z_quadrature

__all__ = ["TARGETS", "Target", "log_z_quadrature"]

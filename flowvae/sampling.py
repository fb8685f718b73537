"""Samples from trained runs: density pictures and arrays, VAE image grids and arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowvae.plots import density_figure, image_grid, save_png


def sample_density(run, n: int, out_file: Path, seed: int = 0) -> None:
    model, target = run.experiment.model, run.experiment.target
    torch.manual_seed(seed)
    if out_file.suffix.lower() == ".npz":
        with torch.no_grad():
            z, log_q = model.sample(n)
        np.savez(out_file, z=z.cpu().double().numpy(), log_q=log_q.cpu().double().numpy())
        return
    cfg = run.cfg
    fig = density_figure(model, target, title=f"{cfg.flow.name} K={cfg.flow.k}")
    fig.savefig(out_file)
    import matplotlib.pyplot as plt

    plt.close(fig)


def sample_vae(run, n: int, out_file: Path, reconstruct: bool = False, seed: int = 0) -> None:
    model, data = run.experiment.model, run.experiment.data
    torch.manual_seed(seed)
    with torch.inference_mode():
        if reconstruct:
            x = data.test[:n]
            mu, sigma, params = model.encode(x)
            z, _ = model.flow(mu + sigma * torch.randn_like(mu), params)
            probs = torch.sigmoid(model.decode(z))
            arrays = {"x": x.cpu().numpy(), "reconstruction": probs.cpu().numpy()}
            # pairs side by side: original, reconstruction, original, ...
            tiles = torch.stack([x, probs], dim=1).reshape(-1, 28, 28)
            nrow = 16
        else:
            z = torch.randn(n, model.latent_dim, device=run.device)
            probs = torch.sigmoid(model.decode(z))
            arrays = {"z": z.cpu().numpy(), "probs": probs.cpu().numpy()}
            tiles = probs.view(-1, 28, 28)
            nrow = max(1, int(np.ceil(np.sqrt(n))))
    if out_file.suffix.lower() == ".npz":
        np.savez(out_file, **arrays)
    else:
        save_png(image_grid(tiles.cpu(), nrow=nrow), out_file)

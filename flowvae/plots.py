"""Pictures: q_K beside the target (the paper's Figure 3), image grids, and KL-vs-K plots."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

BOX = 4.0  # the paper's [-4, 4]² window


def _grid(n: int, box: float = BOX) -> tuple[Tensor, Tensor, Tensor]:
    xs = torch.linspace(-box, box, n)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    return gx, gy, torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def target_density_grid(target, n: int = 200) -> np.ndarray:
    _, _, pts = _grid(n)
    with torch.no_grad():
        return torch.exp(target.log_prob(pts.double())).view(n, n).numpy()


def model_density_grid(model, n: int = 200) -> np.ndarray:
    """Exact q_K on the grid through the flow's inverse (no histogram noise)."""
    _, _, pts = _grid(n)
    p = next(model.parameters())
    with torch.no_grad():
        log_q = model.log_prob(pts.to(device=p.device, dtype=p.dtype))
    return torch.exp(log_q).view(n, n).cpu().double().numpy()


def _figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return arr


def _show(ax, grid: np.ndarray, title: str) -> None:
    ax.imshow(grid, origin="lower", extent=(-BOX, BOX, -BOX, BOX), cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def density_figure(model, target, title: str = "q_K", n: int = 200):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=100)
    _show(axes[0], target_density_grid(target, n), f"target {target.name}")
    _show(axes[1], model_density_grid(model, n), title)
    fig.tight_layout()
    return fig


def density_image(model, target) -> np.ndarray:
    return _figure_to_array(density_figure(model, target, n=120))


def image_grid(images: Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """(N, H, W) in [0, 1] -> an (rows*H, nrow*W, 3) uint8 mosaic."""
    n, h, w = images.shape
    rows = math.ceil(n / nrow)
    canvas = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    arr = images.detach().float().clamp(0, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top : top + h, left : left + w] = arr[i]
    return (np.repeat(canvas[..., None], 3, axis=-1) * 255).astype(np.uint8)


def save_png(array: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)

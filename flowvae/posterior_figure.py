"""Pictures of the posterior view (flowvae.posterior): per image, the image, its reconstruction,
and p(z|x), q_0(z|x), q_K(z|x) on one grid, the true posterior's contours over each."""

from __future__ import annotations

import numpy as np
import torch

from flowvae.posterior import PosteriorGrid, hpd_levels


def _density_panel(ax, log_density: torch.Tensor, grid: PosteriorGrid, levels, title: str):
    ax.imshow(
        torch.exp(log_density).numpy(), origin="lower", extent=grid.box.extent(), cmap="viridis",
        aspect="auto",
    )  # fmt: skip
    xs, ys = (a.numpy() for a in grid.box.axes())
    post = torch.exp(grid.log_post).numpy()
    ax.contour(xs, ys, post, levels=levels, colors="white", linewidths=0.6, alpha=0.8)
    ax.set_title(title, fontsize=7)
    ax.tick_params(labelsize=5)


def _image_panel(ax, picture: torch.Tensor, shape: tuple[int, ...], title: str) -> None:
    img = picture.reshape(shape).float().cpu().numpy()
    if img.ndim == 3:  # (C, H, W) -> (H, W, C)
        img = img.transpose(1, 2, 0)
    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def posterior_figure(rows: list[tuple[int, dict, PosteriorGrid, object]], shape, k: int):
    """``rows``: (image index, numbers, grid, encoded image) per image (flowvae.posterior.analyse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 5, figsize=(10, 2.1 * len(rows)), dpi=110, squeeze=False)
    for ax_row, (index, numbers, grid, enc) in zip(axes, rows):
        levels = hpd_levels(grid.log_post, grid.box.cell)
        _image_panel(ax_row[0], enc.x[0], shape, f"test image {index}, K = {k} model")
        _image_panel(ax_row[1], enc.reconstruction(), shape, "reconstruction at f_K(μ)")
        _density_panel(
            ax_row[2], grid.log_post, grid, levels,
            f"p(z|x), log p(x) = {numbers['log_px_grid']:.2f}",
        )  # fmt: skip
        _density_panel(
            ax_row[3],
            grid.log_q0,
            grid,
            levels,
            f"base q_0(z|x), {numbers['q0_mass']:.0%} of it in view",
        )
        _density_panel(
            ax_row[4],
            grid.log_qk,
            grid,
            levels,
            f"q_K(z|x), K={k}, KL(q_K‖p) = {numbers['kl_q_p']:.2f}",
        )
    fig.tight_layout()
    return fig


def posterior_image(rows, shape, k: int) -> np.ndarray:
    """The figure as an HxWx3 uint8 array (TensorBoard)."""
    fig = posterior_figure(rows, shape, k)
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return arr


#: The validation images TensorBoard shows at each evaluation of a 2-D run (test images when the
#: run holds no validation split), on a coarser grid and without importance sampling.
TENSORBOARD_IMAGES = (0, 1, 2)
TENSORBOARD_GRID = 100


def tensorboard_view(experiment) -> np.ndarray:
    """The posterior view of a few fixed held-out images, as an image for TensorBoard."""
    from flowvae.posterior import view

    split = "valid" if experiment.data.valid.shape[0] else "test"
    rows = view(experiment, list(TENSORBOARD_IMAGES), split, TENSORBOARD_GRID, iw_samples=0)
    return posterior_image(rows, experiment.data.image_shape, experiment.cfg.flow.k)


def stack_pngs(paths: list[str], out: str) -> None:
    """One PNG of several, one above the other (the posterior views of several runs)."""
    from PIL import Image

    parts = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    top = 0
    for part in parts:
        canvas.paste(part, (0, top))
        top += part.height
    canvas.save(out)


if __name__ == "__main__":  # python -m flowvae.posterior_figure OUT.png IN.png IN.png ...
    import sys

    stack_pngs(sys.argv[2:], sys.argv[1])

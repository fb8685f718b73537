"""Pictures: q_K beside the target (the paper's Figure 3), image grids, and KL-vs-K plots."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from flowvae.paper import PaperTable, flow_rank

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
    """(N, H, W) grey or (N, C, H, W) images in [0, 1] (C = 1 or 3) -> an (rows*H, nrow*W, 3)
    uint8 mosaic."""
    arr = images.detach().float().clamp(0, 1).cpu().numpy()
    if arr.ndim == 3:
        arr = arr[:, None]
    arr = np.broadcast_to(arr, (arr.shape[0], 3, *arr.shape[2:])).transpose(0, 2, 3, 1)
    n, h, w, _ = arr.shape
    rows = math.ceil(n / nrow)
    canvas = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top : top + h, left : left + w] = arr[i]
    return (canvas * 255).astype(np.uint8)


def save_png(array: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)


def nll_plot(rows: list[dict], path, paper: PaperTable | None = None) -> None:
    """The paper's Figure 4: measured −log p(x) ± s.e. against K per flow family, with the values
    of ``paper`` (a flowvae.paper.PaperTable, or None) dashed; beside it the posterior gap
    −ELBO − (−log p(x)), an estimate of KL(q‖p(z|x)) that a better flow should shrink."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    base = [r for r in rows if r["k"] == 0]
    paper_ks = sorted({0, *(k for _, k in paper.values)}) if paper is not None else []
    for flow in sorted({r["flow"] for r in rows if r["k"] > 0}):
        pts = sorted(
            [r for r in rows if r["flow"] == flow and r["k"] > 0] + base, key=lambda r: r["k"]
        )
        ks = [r["k"] for r in pts]
        line = ax.errorbar(
            ks,
            [r["nll"] for r in pts],
            yerr=[r["nll_stderr"] for r in pts],
            marker="o",
            label=f"{flow} (measured)",
            capsize=2,
        )
        gap_ax.plot(
            ks, [r["neg_elbo"] - r["nll"] for r in pts], marker="o", color=line[0].get_color()
        )
        published = [(k, paper.nll(flow, k)) for k in paper_ks if paper.nll(flow, k) is not None]
        if published:
            ax.plot(
                *zip(*published), linestyle="--", marker="x", alpha=0.6, label=f"{flow} (paper)"
            )
    ax.set_ylabel("test −log p(x) (nats)")
    gap_ax.set_ylabel("−ELBO − (−log p(x)) (nats)")
    ax.legend(fontsize=7)
    for a in (ax, gap_ax):
        a.set_xlabel("flow length K")
        a.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def figure3_grid(rows: list[dict], models: dict, path, n: int = 100) -> None:
    """Targets (rows) × the target itself and each (flow, K) (columns), as in the paper's
    Figure 3; ``models`` maps (target, flow, K) to the fitted density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowvae.targets import TARGETS

    targets = sorted({r["target"] for r in rows})
    columns = sorted({(r["flow"], r["k"]) for r in rows}, key=lambda fk: (*flow_rank(fk[0]), fk[1]))
    by_key = {(r["target"], r["flow"], r["k"]): r for r in rows}
    fig, axes = plt.subplots(
        len(targets),
        len(columns) + 1,
        figsize=(1.3 * (len(columns) + 1), 1.35 * len(targets)),
        dpi=110,
        squeeze=False,
    )
    for i, t in enumerate(targets):
        panels = [(f"{t}", target_density_grid(TARGETS.get(t), n))]
        for flow, k in columns:
            r = by_key.get((t, flow, k))
            if r is None:
                panels.append((f"{flow} K={k}", None))
                continue
            grid = model_density_grid(models[(t, flow, k)], n)
            panels.append((f"{flow} K={k}\nKL {r['kl']:.2f}", grid))
        for j, (title, grid) in enumerate(panels):
            ax = axes[i][j]
            if grid is not None:
                ax.imshow(grid, origin="lower", extent=(-BOX, BOX, -BOX, BOX), cmap="viridis")
            ax.set_title(title, fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)

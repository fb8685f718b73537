"""flowvae from Python: ``flowvae.load(path)`` a trained run, ``flowvae.train(config, ...)`` one.

>>> import flowvae
>>> run = flowvae.train("energy", out="runs/u1", train={"steps": 2000})
>>> q = flowvae.load(run)                     # a run folder (its best.pt) or a checkpoint
>>> z, log_q = q.sample(1000, seed=0)

Everything is computed by the code the CLI runs (flowvae.runs, the experiments' evaluation),
so the numbers are the CLI's: ``flowvae.load(ckpt).evaluate()`` is `flowvae eval --json`, and a
VAE's ``log_px(x, samples=S, seed=s)`` of the first N test images is, image by image, the
``nll_per_image`` of `flowvae eval --limit N --iw-samples S --seed s`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Independent, Normal, TransformedDistribution

from flowvae import plugins
from flowvae.config import Config, apply_override, from_dict, read_config, to_dict
from flowvae.errors import ConfigError
from flowvae.experiments import EvalOptions, gaussian_log_prob
from flowvae.importance import sharded_importance_nll
from flowvae.runs import LoadedRun, evaluate, load_run

__all__ = ["Posterior", "TrainedDensity", "TrainedVAE", "load", "train"]


# -- training -----------------------------------------------------------------------------------


def train(
    config: str | Path | dict | Config | None = None,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Train as `flowvae train --config CONFIG --set ... --out OUT [--resume]` does; returns
    the run folder.

    ``config``: a YAML file, a shipped config's name, a mapping of keys, or a Config (None:
    the defaults). ``overrides`` set keys as --set does, a section's keys as a mapping merged
    into it (``flow={"k": 4}``, ``train={"steps": 500}``) or one key by its dotted name
    (``**{"flow.k": 4}``). A relative ``file.py:Class`` in them is read from the working
    directory, as with --set. ``out`` defaults to the CLI's runs/<what>-<flow>-k<K>-s<seed>;
    the folder comes back as an absolute path.
    """
    from rich.console import Console

    from flowvae.run_folder import default_out_dir
    from flowvae.train import train as run_training

    data = _config_data(config)
    for key, value in overrides.items():
        items = value.items() if isinstance(value, dict) and "." not in key else [(None, value)]
        for sub, v in items:
            apply_override(data, [*key.split("."), *([sub] if sub else [])], v)
    plugins.absolute_names(data, Path.cwd())
    cfg = from_dict(data)
    target = Path(out) if out is not None else default_out_dir(cfg)
    console = Console(stderr=True)
    result = run_training(cfg, target, resume=resume, console=console, progress=progress)
    return result.out_dir.resolve()


def _config_data(config: str | Path | dict | Config | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, Config):
        return to_dict(config)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    return read_config(config)


# -- loading ------------------------------------------------------------------------------------


def load(
    path: str | Path, device: str = "auto", data_root: str | None = None
) -> TrainedVAE | TrainedDensity:
    """The trained model of a checkpoint, or of a run folder (its checkpoints/best.pt).

    ``device`` as for `flowvae eval` (auto, cpu, cuda); ``data_root`` points a VAE run at its
    dataset's folder when it has moved. A flow or target from a module or file is imported
    again from the name its config stores; a missing one is a one-line ConfigError.
    """
    path = Path(path)
    ckpt = path / "checkpoints" / "best.pt" if path.is_dir() else path
    if path.is_dir() and not ckpt.is_file():
        raise ConfigError(f"{path} holds no checkpoints/best.pt — pass a checkpoint file")
    run = load_run(ckpt, device=device, data_root=data_root)
    return KINDS[run.cfg.experiment](run, ckpt)


class Trained:
    """What every loaded run has: its config, model, step, and the CLI's evaluation."""

    def __init__(self, run: LoadedRun, path: Path) -> None:
        self.run, self.path = run, path
        #: the run's resolved config (flowvae.config.Config)
        self.config: Config = run.cfg
        #: the torch module with the trained weights, in eval mode
        self.model = run.experiment.model
        #: the training step the checkpoint was saved at
        self.step = int(run.ckpt["step"])
        self.device = run.device

    def evaluate(self, **options: Any) -> dict[str, Any]:
        """`flowvae eval --json`'s dict; ``options`` are EvalOptions fields: samples,
        iw_samples, split, limit, seed, max_rows, psis."""
        return evaluate(self.run, EvalOptions(**options))

    def __repr__(self) -> str:
        c = self.config
        return f"<{type(self).__name__} {c.flow.name} K={c.flow.k} step {self.step} {self.path}>"


class TrainedDensity(Trained):
    """A density run: q_K(z), a flow over a Gaussian base fitted to a 2-D energy."""

    @property
    def target(self):
        """The energy it was fitted to (flowvae.targets.Target: energy, log_z, log_prob)."""
        return self.run.experiment.target

    def sample(self, n: int, seed: int | None = 0) -> tuple[Tensor, Tensor]:
        """n samples z ~ q_K and their exact log q_K(z): `flowvae sample --out z.npz`'s arrays
        at the same seed (None: the current torch random state)."""
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            return self.model.sample(n)

    def log_q(self, z: Tensor) -> Tensor:
        """log q_K(z) at any points (N, 2), through the flow's inverse."""
        with torch.no_grad():
            return self.model.log_prob(_on(z, self.device))

    def kl(self, samples: int | None = None, seed: int = 0) -> float:
        """KL(q‖p) in nats against the exact normaliser, as `flowvae eval` reports it."""
        return self.evaluate(samples=samples, seed=seed)["kl"]

    def distribution(self) -> TransformedDistribution:
        """q_K as a torch.distributions.TransformedDistribution (log_prob, rsample, ...)."""
        m = self.model
        base = Independent(Normal(m.mu, m.log_sigma.exp()), 1)
        return TransformedDistribution(base, m.flow.as_transform())


class Posterior(NamedTuple):
    """q(z|x)'s parameters per image: the base N(mu, sigma²) and the flow's parameters (None
    for a global or flow-free stack)."""

    mu: Tensor
    sigma: Tensor
    flow_params: Tensor | None


class TrainedVAE(Trained):
    """A flow VAE: encoder q(z|x) = flow(N(mu(x), sigma(x)²)), decoder p(x|z), prior N(0, I).

    Images go in as rows (N, D) or in their shape (N, H, W) / (N, C, H, W), with pixel values
    as the likelihood scores them: {0, 1} for Bernoulli, (eps, 1 - eps) for logit-normal (the
    run's own splits, ``images(split)``, are already so)."""

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.run.experiment.data.image_shape)

    def images(self, split: str = "test") -> Tensor:
        """The run's dataset split (train, valid, test) as `flowvae eval` sees it, (N, D)."""
        return getattr(self.run.experiment.data, split)

    def _rows(self, x: Tensor) -> Tensor:
        return _on(x, self.device).reshape(x.shape[0], -1).float()

    def encode(self, x: Tensor) -> Posterior:
        """mu, sigma (N, latent) and the flow parameters (N, P) of q(z|x)."""
        with torch.no_grad():
            return Posterior(*self.model.encode(self._rows(x)))

    def posterior(
        self, x: Tensor, samples: int = 1, seed: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """z_K ~ q(z|x), shape (N, samples, latent), and log q(z_K|x), shape (N, samples)."""
        mu, sigma, params = self.encode(x)
        gen = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        n, d = mu.shape
        eps = torch.randn(n, samples, d, generator=gen, device=self.device)
        with torch.no_grad():
            z0 = (mu.unsqueeze(1) + sigma.unsqueeze(1) * eps).reshape(n * samples, d)
            rows = None if params is None else params.repeat_interleave(samples, dim=0)
            z, log_det = self.model.flow(z0, rows)
        log_q = gaussian_log_prob(eps) - sigma.log().sum(-1, keepdim=True) - log_det.view(n, -1)
        return z.view(n, samples, d), log_q

    def distribution(self, x: Tensor) -> TransformedDistribution:
        """q(z|x) for a batch as a torch.distributions.TransformedDistribution with batch
        shape (N,): ``rsample()`` gives one z_K per image, ``log_prob(z)`` scores (N, latent)."""
        mu, sigma, params = self.encode(x)
        base = Independent(Normal(mu, sigma), 1)
        return TransformedDistribution(base, self.model.flow.as_transform(params))

    def decode(self, z: Tensor) -> Tensor:
        """p(x|z)'s parameters per row of z: Bernoulli logits (N, D), or logit-normal
        [mu | log sigma] (N, 2D)."""
        with torch.no_grad():
            return self.model.decode(_on(z, self.device).float())

    def mean(self, z: Tensor) -> Tensor:
        """What p(x|z) looks like, in [0, 1], as images: Bernoulli probabilities, or the
        logit-normal median."""
        with torch.no_grad():
            return self.model.picture(_on(z, self.device).float()).reshape(-1, *self.image_shape)

    def sample(self, n: int, seed: int | None = 0) -> Tensor:
        """n new images from z ~ N(0, I): `flowvae sample --out x.npz`'s pictures at the same
        seed (None: the current torch random state)."""
        if seed is not None:
            torch.manual_seed(seed)
        z = torch.randn(n, self.model.latent_dim, device=self.device)
        return self.mean(z)

    def scores(self, x: Tensor, samples: int = 200, seed: int = 0) -> dict[str, Tensor]:
        """Per image (float64): importance-sampled log p(x) with ``samples`` draws ("log_px"),
        the average of their log-weights, an ELBO ("elbo"), and the weights' Pareto k̂ and
        effective sample size: `flowvae eval`'s own computation and noise at ``seed``."""
        per_image = sharded_importance_nll(self.model, self._rows(x), samples, seed=seed)
        return {
            "log_px": -per_image["nll"],
            "elbo": -per_image["neg_elbo"],
            "khat": per_image["khat"],
            "ess": per_image["ess"],
        }

    def log_px(self, x: Tensor, samples: int = 200, seed: int = 0) -> Tensor:
        """Importance-sampled log p(x) per image, S = ``samples`` (a lower bound in expectation
        that tightens with S)."""
        return self.scores(x, samples, seed)["log_px"]

    def elbo(self, x: Tensor, samples: int = 1, seed: int = 0) -> Tensor:
        """The ELBO per image, averaged over ``samples`` draws of q(z|x)."""
        return self.scores(x, samples, seed)["elbo"]


#: experiment -> what load() returns for it
KINDS = {"vae": TrainedVAE, "density": TrainedDensity}


def _on(t: Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(t).to(device)

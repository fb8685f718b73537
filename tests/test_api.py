"""The Python API against the CLI on the same checkpoints: flowvae.load(...) gives `flowvae eval
--json`'s numbers to the last printed digit and `flowvae sample`'s arrays at the same seed, and
flowvae.train(...) trains what `flowvae train` trains, bit for bit. The CLI calls run the Typer
app in this process (tests/test_density_cli.py trains through `python -m flowvae`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import invoke_cli

import flowvae
from flowvae.errors import ConfigError
from flowvae.experiments import gaussian_log_prob

DENSITY_SETS = [
    "--set", "flow.k=4", "--set", "train.steps=150", "--set", "train.eval_every=50",
    "--set", "train.checkpoint_every=50", "--set", "eval.valid_samples=1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, mnist_dir):
    work = tmp_path_factory.mktemp("api-vae")
    proc = invoke_cli(
        "train", "--config", "mnist_quick", "--set", f"data.root={mnist_dir}",
        "--set", "model.hidden=[64]", "--set", "flow.k=3", "--set", "train.steps=40",
        "--set", "train.eval_every=40", "--set", "data.valid_size=500", "--no-progress",
        "--out", work / "run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return work / "run"


@pytest.fixture(scope="module")
def energy_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("api-energy")
    proc = invoke_cli("train", "--config", "energy", *DENSITY_SETS, "--no-progress", "--out",
                      work / "run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return work / "run"


def cli_json(run_cli, *args, cwd):
    proc = run_cli("eval", *args, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_vae_log_px_and_elbo_equal_eval_json(vae_run, cli_in_process, mnist_dir):
    run_cli = cli_in_process
    ckpt = vae_run / "checkpoints" / "best.pt"
    printed = cli_json(run_cli, ckpt, "--limit", "40", "--iw-samples", "25", "--seed", "3",
                       cwd=vae_run)  # fmt: skip
    vae = flowvae.load(vae_run, data_root=str(mnist_dir))  # the run folder: its best.pt
    x = vae.images("test")[:40]
    scores = vae.scores(x, samples=25, seed=3)
    # to the last printed digit: the same floats
    assert json.dumps(-float(scores["log_px"].mean())) == json.dumps(printed["nll"])
    assert json.dumps(-float(scores["elbo"].mean())) == json.dumps(printed["neg_elbo"])
    assert [round(-v, 4) for v in scores["log_px"].tolist()] == printed["nll_per_image"]
    assert torch.equal(vae.log_px(x, samples=25, seed=3), scores["log_px"])
    again = vae.evaluate(limit=40, iw_samples=25, seed=3)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in printed.items() if k != "seconds"
    }
    # more samples, a tighter bound: log p(x) ≥ ELBO image by image in expectation, and on
    # average here
    assert float(vae.log_px(x, samples=50).mean()) > float(vae.elbo(x, samples=50).mean())


def test_vae_posterior_decode_and_sample(vae_run, cli_in_process, tmp_path, mnist_dir):
    run_cli = cli_in_process
    vae = flowvae.load(vae_run / "checkpoints" / "best.pt", data_root=str(mnist_dir))
    x = vae.images("test")[:6]
    assert vae.image_shape == (28, 28)
    post = vae.encode(x.reshape(6, 28, 28))  # images in their shape work too
    assert post.mu.shape == (6, 40) and (post.sigma > 0).all()
    assert post.flow_params.shape == (6, vae.model.flow.num_params)
    z, log_q = vae.posterior(x, samples=4, seed=1)
    assert z.shape == (6, 4, 40) and log_q.shape == (6, 4)
    # log q(z_K|x) as the flow scores it, and as torch.distributions does through the inverse
    q = vae.distribution(x)
    assert torch.allclose(q.log_prob(z[:, 0].clone()), log_q[:, 0], atol=1e-3)
    # the ELBO from these pieces, log p(x|z) + log p(z) - log q(z|x) over 200 draws, against
    # the API's elbo() over 200 others: equal within the noise
    z, log_q = (t.flatten(0, 1) for t in vae.posterior(x, samples=200, seed=2))
    log_px_z = vae.model.likelihood.log_prob(vae.decode(z), x.repeat_interleave(200, 0))
    log_w = (log_px_z + gaussian_log_prob(z) - log_q).double()
    stderr = float(log_w.view(6, 200).std(1).mean()) / math.sqrt(1200)
    assert abs(float(log_w.mean()) - float(vae.elbo(x, samples=200).mean())) < 6 * stderr
    pictures = vae.sample(9, seed=2)
    assert (
        pictures.shape == (9, 28, 28) and 0 <= float(pictures.min()) <= float(pictures.max()) <= 1
    )
    proc = run_cli("sample", vae_run / "checkpoints" / "best.pt", "--n", "9", "--seed", "2",
                   "--out", tmp_path / "s.npz", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["probs"], pictures.reshape(9, -1))


def test_density_kl_samples_and_log_q_equal_the_cli(energy_run, cli_in_process, tmp_path):
    run_cli = cli_in_process
    ckpt = energy_run / "checkpoints" / "best.pt"
    printed = cli_json(run_cli, ckpt, "--samples", "5000", "--seed", "7", cwd=tmp_path)
    q = flowvae.load(ckpt)
    assert json.dumps(q.kl(samples=5000, seed=7)) == json.dumps(printed["kl"])
    proc = run_cli("sample", ckpt, "--n", "300", "--seed", "4", "--out", tmp_path / "z.npz",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    arrays = np.load(tmp_path / "z.npz")
    z, log_q = q.sample(300, seed=4)
    np.testing.assert_array_equal(arrays["z"], z.double().numpy())
    np.testing.assert_array_equal(arrays["log_q"], log_q.double().numpy())
    # log q at the sampled points through the inverse (planar: numerical) and through torch
    assert torch.allclose(q.log_q(z), log_q, atol=1e-4)
    assert torch.allclose(q.distribution().log_prob(z.clone()), log_q, atol=1e-4)
    assert q.target.name == "U1" and math.isfinite(q.target.log_z)


def test_train_runs_what_the_cli_runs(energy_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = flowvae.train(
        "energy",
        out="api",
        flow={"k": 4},
        train={"steps": 150, "eval_every": 50, "checkpoint_every": 50},
        **{"eval.valid_samples": 1000},
    )
    assert run == tmp_path / "api"
    for name in ("best.pt", "last.pt"):
        mine = torch.load(run / "checkpoints" / name, weights_only=True)
        cli = torch.load(energy_run / "checkpoints" / name, weights_only=True)
        assert mine["step"] == cli["step"]
        assert all(torch.equal(mine["model"][k], cli["model"][k]) for k in cli["model"])
    assert (run / "config.yaml").read_text() == (energy_run / "config.yaml").read_text()


def test_load_refuses_a_folder_without_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoints/best.pt"):
        flowvae.load(tmp_path)

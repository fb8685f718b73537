"""bf16 autocast for the VAE's encoder and decoder: the MLPs run in bfloat16, the flow, its
log-det and every density term stay float32 (on the CPU here; the same code path runs on CUDA)."""

import pytest
import torch

from flowvae.experiments.vae import FlowVAE, free_energy


def _model(precision: str) -> FlowVAE:
    torch.manual_seed(0)
    return FlowVAE(
        x_dim=784, latent_dim=8, hidden=[64], flow_name="planar", k=3, precision=precision
    )


def test_bf16_runs_the_nets_in_bf16_and_the_flow_in_float32():
    model = _model("bf16")
    seen = {}
    model.encoder[0].linear.register_forward_hook(lambda _m, _i, o: seen.update(enc=o.dtype))
    model.decoder_out.register_forward_hook(lambda _m, _i, o: seen.update(dec=o.dtype))
    x = torch.bernoulli(torch.full((16, 784), 0.3))
    eps = torch.randn(16, 8)
    terms = model(x, eps)
    assert seen == {"enc": torch.bfloat16, "dec": torch.bfloat16}
    assert all(t.dtype == torch.float32 for t in terms.values())
    # The flow part is exactly the float32 computation on the (float32) encoder outputs.
    mu, sigma, params = model.encode(x)
    assert mu.dtype == sigma.dtype == params.dtype == torch.float32
    _, log_det = model.flow(mu + sigma * eps, params)
    z0_log_q = (
        -0.5 * (eps**2).sum(-1) - 4 * torch.log(torch.tensor(2 * torch.pi)) - sigma.log().sum(-1)
    )
    torch.testing.assert_close(terms["log_q"], z0_log_q - log_det, rtol=1e-5, atol=1e-4)


def test_bf16_is_close_to_float32_and_trains():
    fp32, bf16 = _model("float32"), _model("bf16")
    bf16.load_state_dict(fp32.state_dict())
    x = torch.bernoulli(torch.full((32, 784), 0.3))
    eps = torch.randn(32, 8)
    a = free_energy(fp32(x, eps), 1.0)
    b = free_energy(bf16(x, eps), 1.0)
    # bf16 keeps 8 bits of mantissa: the per-image -ELBO (~540 nats here) agrees to well under 1%.
    assert torch.allclose(a, b, rtol=1e-2), (a - b).abs().max()
    assert not torch.equal(a, b)  # it really ran in lower precision
    opt = torch.optim.Adam(bf16.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        loss = free_energy(bf16(x, eps), 1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert torch.isfinite(loss) and float(loss.detach()) < first - 50


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        _model("fp8")


def test_bf16_config_trains_through_the_cli(tmp_path, mnist_dir, cli_in_process):
    run_cli = cli_in_process
    out = tmp_path / "bf16"
    proc = run_cli(
        "train", "--config", "mnist_quick",
        "--set", f"data.root={mnist_dir}", "--set", "model.precision=bf16",
        "--set", "model.hidden=[64]", "--set", "flow.k=2", "--set", "train.steps=20",
        "--set", "train.eval_every=20", "--set", "data.valid_size=500", "--no-progress",
        "--out", out, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["model"]["precision"] == "bf16"
    # Weights and optimiser state stay float32: autocast only changes the arithmetic.
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())

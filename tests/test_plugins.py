"""Flows and targets from outside the package: a class in a file beside the config, in an
importable module, or behind an installed package's entry point, through config reading,
training, eval, sample, sweep and --resume, each in a process of its own as a user runs them
(forked from tests/forkserver.py's server, which saves the interpreter's start; the one-line
errors of a moved file and of an uninstalled package come from ``python -m flowvae`` itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import flowvae
from flowvae import flows, plugins
from flowvae.config import load_config
from flowvae.errors import ConfigError
from flowvae.plugins import PluginError
from flowvae.targets import TARGETS

#: An elementwise affine flow written only against the documented contract.
FLOW_SOURCE = textwrap.dedent(
    '''
    import torch
    from flowvae import flows


    class ElementwiseAffine(flows.Flow):
        """y = z * exp(s) + t, one scale and shift per dimension."""

        def param_shapes(self):
            return {"log_scale": (self.dim,), "shift": (self.dim,)}

        def transform(self, z, log_scale, shift):
            log_det = log_scale.sum(-1).expand(z.shape[0])
            return z * log_scale.exp() + shift, log_det

        def inverse_transform(self, y, log_scale, shift):
            return (y - shift) * torch.exp(-log_scale)
    '''
)

TARGET_SOURCE = textwrap.dedent(
    """
    import math
    from flowvae.targets import Target

    def ring(z):
        return 0.5 * ((z.norm(dim=-1) - 2.0) / 0.4) ** 2

    class Ring(Target):
        @property
        def log_z(self):  # ∫ exp(-U) over R² by quadrature is flowvae's job for U1; here a number
            return math.log(2 * math.pi * 2.0 * 0.4 * math.sqrt(2 * math.pi))

    RING = Ring("ring", ring, False, None)
    """
)

#: Every density run here: tiny, but long enough for a checkpoint to be resumed mid-way; a
#: constant learning rate, so stopping at 100 of 200 steps is the same run up to there.
DENSITY = {"steps": 200, "eval_every": 100, "checkpoint_every": 100, "log_every": 50}
DENSITY["lr_schedule"] = "constant"


def write_outside(folder: Path) -> Path:
    """The flow's file and a config beside it naming it by a relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "myflows.py").write_text(FLOW_SOURCE)
    train = ", ".join(f"{k}: {v}" for k, v in DENSITY.items())
    (folder / "u1.yaml").write_text(
        "extends: energy\n"
        "flow: {name: myflows.py:ElementwiseAffine, k: 3}\n"
        f"train: {{{train}}}\n"
        "eval: {samples: 4000, valid_samples: 2000}\n"
    )
    return folder / "u1.yaml"


# -- names, resolution and errors (in process) --------------------------------------------------


def test_a_relative_file_is_read_beside_the_config_and_stored_absolute(tmp_path, monkeypatch):
    config = write_outside(tmp_path / "outside")
    monkeypatch.chdir(tmp_path)  # elsewhere: the path is the config's, not the cwd's
    cfg = load_config(config)
    assert cfg.flow.name == f"{tmp_path / 'outside' / 'myflows.py'}:ElementwiseAffine"
    cls = flows.get(cfg.flow.name)
    assert issubclass(cls, flows.Flow) and cls.__name__ == "ElementwiseAffine"
    assert flows.get(cfg.flow.name) is cls  # imported once per process
    stack = flows.build(cfg.flow.name, dim=3, k=2)
    z = torch.randn(5, 3)
    y, log_det = stack(z)
    assert torch.allclose(stack.inverse(y), z, atol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda v: stack(v.unsqueeze(0))[0][0], z[0])
    assert float(log_det[0].detach()) == pytest.approx(
        float(torch.linalg.slogdet(jac)[1]), abs=1e-5
    )
    assert (
        plugins.origin(flows.FLOWS, cfg.flow.name) == f"file {tmp_path / 'outside' / 'myflows.py'}"
    )


def test_set_reads_a_relative_file_from_the_working_directory(tmp_path, monkeypatch):
    write_outside(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["flow.name=myflows.py:ElementwiseAffine"])
    assert cfg.flow.name == f"{tmp_path / 'myflows.py'}:ElementwiseAffine"


def test_a_module_spec_and_a_target_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "userflows_35.py").write_text(FLOW_SOURCE)
    (tmp_path / "ring.py").write_text(TARGET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        "energy", ["flow.name=userflows_35:ElementwiseAffine", "target.name=ring.py:RING"]
    )
    assert cfg.flow.name == "userflows_35:ElementwiseAffine"
    assert plugins.origin(flows.FLOWS, cfg.flow.name) == "module userflows_35"
    target = TARGETS.get(cfg.target.name)
    assert target.name == "ring" and target.log_z == pytest.approx(2.5336, abs=1e-4)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_35:Flow", "no module named 'no_such_module_35' — install it"),
        ("missing.py:Flow", "missing.py does not exist"),
        ("myflows.py:ElementwiseAfine", "has no attribute 'ElementwiseAfine' — did you mean "),
        ("os:path", "(module os) is not a subclass of flowvae.flows.Flow"),
        ("broken.py:X", "importing"),
    ],
)
def test_a_plugin_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch, name, message):
    write_outside(tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"flow.name={name}"])
    assert isinstance(info.value, PluginError)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_plain_unknown_name_still_suggests():
    with pytest.raises(ConfigError, match="did you mean 'planar'"):
        load_config(None, ["flow.name=plnar"])


def make_package(site: Path) -> Path:
    """An installed package declaring the flow under the entry-point group flowvae.flows:
    what `pip install` leaves in site-packages (the module and a dist-info folder)."""
    (site / "myflowpkg").mkdir(parents=True)
    (site / "myflowpkg" / "__init__.py").write_text(FLOW_SOURCE)
    info = site / "myflowpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myflowpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[flowvae.flows]\naffine_ep = myflowpkg:ElementwiseAffine\n"
    )
    return site


def test_entry_points_are_listed_and_built(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(make_package(tmp_path / "site")))
    assert "affine_ep" in flows.available()
    assert plugins.origin(flows.FLOWS, "affine_ep") == (
        "entry point myflowpkg:ElementwiseAffine (package myflowpkg 0.1)"
    )
    assert load_config(None, ["flow.name=affine_ep"]).flow.name == "affine_ep"
    assert flows.build("affine_ep", dim=2, k=2, amortized=True).num_params == 8
    assert plugins.origin(flows.FLOWS, "planar") == "built-in"


def test_flowvae_list_says_where_each_flow_comes_from(tmp_path, monkeypatch, cli_in_process):
    monkeypatch.syspath_prepend(str(make_package(tmp_path / "site")))
    listed = cli_in_process("list", cwd=tmp_path)
    assert listed.returncode == 0
    rows: dict[str, str] = {}
    name = None
    for line in listed.stdout.splitlines():
        if line.count("│") == 3:  # the flow table; a long origin folds onto the next lines
            cells = [c.strip() for c in line.split("│")[1:3]]
            name = cells[0] or name
            rows[name] = " ".join(filter(None, [rows.get(name, ""), cells[1]]))
    assert rows["affine_ep"] == "entry point myflowpkg:ElementwiseAffine (package myflowpkg 0.1)"
    assert all(rows[name] == "built-in" for name in ("planar", "nice", "sylvester_triangular"))


# -- end to end, each command in a fresh process ------------------------------------------------


def cli_env(extra_path: Path | None = None) -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    paths = [str(extra_path)] if extra_path else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(root), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def cli(fork_server):
    """``cli(*args, cwd=..., env=...)``: ``flowvae ARGS`` in a process of its own, which must
    succeed without a traceback."""

    def run(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = fork_server().run(list(args), cwd=cwd, env=env or cli_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        return proc

    return run


def weights(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


@pytest.mark.slow
def test_a_file_flow_trains_evaluates_samples_and_resumes_on_u1(tmp_path, cli):
    config = write_outside(tmp_path / "outside")
    work = tmp_path / "work"
    work.mkdir()
    cli("train", "--config", config, "--no-progress", "--out", "full", cwd=work)
    # interrupted at step 100, then resumed from another folder: the run's name still imports
    cli("train", "--config", config, "--set", "train.steps=100", "--no-progress",
        "--out", work / "part", cwd=work)  # fmt: skip
    cli("train", "--config", config, "--resume", "--no-progress", "--out", work / "part",
        cwd=tmp_path)  # fmt: skip
    full, part = weights(work / "full"), weights(work / "part")
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)

    ckpt = work / "full" / "checkpoints" / "best.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["sources"]["flow.name"] == f"file {tmp_path / 'outside' / 'myflows.py'}"
    result = json.loads(cli("eval", ckpt, "--json", "--samples", "4000", cwd=tmp_path).stdout)
    assert result["flow"].endswith("myflows.py:ElementwiseAffine") and result["k"] == 3
    # the sampled KL against a quadrature of q's own density (through the flow's inverse) on a
    # grid: q = an affine map of a Gaussian, so [-10, 10]² holds all its mass
    q = flowvae.load(ckpt)  # imports the file in this process
    grid = torch.linspace(-10, 10, 801, dtype=torch.float64)
    z = torch.cartesian_prod(grid, grid)
    log_q = q.log_q(z.float()).double()
    cell = float(grid[1] - grid[0]) ** 2
    kl = float((log_q.exp() * (log_q + q.target.energy(z))).sum()) * cell + q.target.log_z
    assert abs(result["kl"] - kl) < 4 * result["kl_stderr"] + 1e-3, (result, kl)
    cli("sample", ckpt, "--out", "z.npz", "--n", "500", cwd=tmp_path)
    z = np.load(tmp_path / "z.npz")
    assert z["z"].shape == (500, 2) and np.isfinite(z["log_q"]).all()

    # the file moved away: one line naming it, exit 2
    (tmp_path / "outside" / "myflows.py").rename(tmp_path / "elsewhere.py")
    proc = subprocess.run(
        [sys.executable, "-m", "flowvae", "eval", str(ckpt)],
        capture_output=True, text=True, cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = " ".join(proc.stderr.split())
    assert f"file {tmp_path / 'outside' / 'myflows.py'} does not exist" in line


@pytest.mark.slow
def test_a_file_flow_trains_a_vae_amortised_and_global(tmp_path, mnist_dir, cli):
    write_outside(tmp_path / "outside")
    spec = "outside/myflows.py:ElementwiseAffine"  # --set: relative to the working directory
    common = [
        "--config", "mnist_quick", "--set", f"data.root={mnist_dir}", "--set", f"flow.name={spec}",
        "--set", "flow.k=2", "--set", "model.hidden=[64]", "--set", "data.valid_size=500",
        "--set", "train.eval_every=20", "--set", "train.checkpoint_every=10", "--no-progress",
        "--set", "train.lr_schedule=constant",  # so that --resume may lengthen the run
    ]  # fmt: skip
    for amortized in ("true", "false"):
        out = tmp_path / f"vae-{amortized}"
        args = [*common, "--set", f"flow.amortized={amortized}", "--out", out]
        if amortized == "true":  # stopped at 10 and resumed (the U1 test resumes a global flow)
            cli("train", *args, "--set", "train.steps=10", cwd=tmp_path)
            cli("train", *args, "--set", "train.steps=20", "--resume", cwd=tmp_path)
        else:
            cli("train", *args, "--set", "train.steps=20", cwd=tmp_path)
        assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 20
        has_head = any(k.startswith("flow_head") for k in weights(out))
        assert has_head == (amortized == "true")
        evaluated = cli(
            "eval", out / "checkpoints" / "best.pt", "--json", "--limit", "50",
            "--iw-samples", "10", cwd=out,
        )  # fmt: skip
        r = json.loads(evaluated.stdout)
        assert r["flow"] == f"{tmp_path / spec}" and r["examples"] == 50
        assert 0 < r["nll"] <= r["neg_elbo"] < 1000  # 20 updates: far from trained, but finite
        cli("sample", out / "checkpoints" / "best.pt", "--out", "grid.png", "--n", "16", cwd=out)
        assert (out / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_a_file_flow_sweeps(tmp_path, cli):
    config = write_outside(tmp_path / "outside")
    cli("sweep", "--config", config, "--grid", "flow.k=1,2", "--out", "grid", "--samples",
        "2000", "--no-progress", cwd=tmp_path)  # fmt: skip
    for k in (1, 2):
        r = json.loads((tmp_path / "grid" / f"k{k}" / "eval.json").read_text())
        assert r["k"] == k and r["flow"].endswith("myflows.py:ElementwiseAffine")
    again = cli("sweep", "--config", config, "--grid", "flow.k=1,2", "--out", "grid",
                "--samples", "2000", "--no-progress", cwd=tmp_path)  # fmt: skip
    assert again.stderr.splitlines() == ["[1/2] k1: done", "[2/2] k2: done"]


@pytest.mark.slow
def test_an_installed_package_shows_in_list_and_trains(tmp_path, cli):
    env = cli_env(make_package(tmp_path / "site"))
    listed = cli("list", cwd=tmp_path, env=env).stdout
    row = next(line for line in listed.splitlines() if "affine_ep" in line and "entry" in line)
    assert "entry point myflowpkg:ElementwiseAffine (package myflowpkg 0.1)" in row
    cli("train", "--config", "energy", "--set", "flow.name=affine_ep", "--set", "flow.k=2",
        *[f"--set=train.{k}={v}" for k, v in DENSITY.items()], "--set", "eval.valid_samples=500",
        "--no-progress", "--out", "run", cwd=tmp_path, env=env)  # fmt: skip
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    source = torch.load(ckpt, weights_only=True)["sources"]["flow.name"]
    assert source == "entry point myflowpkg:ElementwiseAffine (package myflowpkg 0.1)"
    r = json.loads(cli("eval", ckpt, "--json", "--samples", "2000", cwd=tmp_path, env=env).stdout)
    assert r["flow"] == "affine_ep"
    # uninstalled: the name is unknown again, said in one line
    proc = subprocess.run(
        [sys.executable, "-m", "flowvae", "eval", str(ckpt)],
        capture_output=True, text=True, cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert proc.returncode == 2 and "'affine_ep' is unknown" in proc.stderr

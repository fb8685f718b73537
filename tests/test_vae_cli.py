"""The flow VAE end to end on the real MNIST files through the CLI: a few hundred steps of
training, importance-sampled evaluation against an untrained model, and the sample outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import invoke_cli

TRAIN_STEPS = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory, mnist_dir):
    """{'trained': run folder after 300 steps, 'untrained': the same model after 1 step}. The
    trained run is the CLI (the Typer app, in this process) on the real MNIST files; the
    untrained one, only a reference, is trained by flowvae.train.train. (VAE runs on MNIST
    train in `python -m flowvae` processes in tests/test_sweep_jobs.py's --jobs workers.)"""
    from flowvae.config import load_config
    from flowvae.train import train

    work = tmp_path_factory.mktemp("vae")
    sets = [f"data.root={mnist_dir}", "model.hidden=[200]", "flow.k=4", "train.eval_every=150"]
    sets += ["data.valid_size=1000"]
    trained = work / "trained"
    args = [a for s in [*sets, f"train.steps={TRAIN_STEPS}"] for a in ("--set", s)]
    proc = invoke_cli("train", "--config", "mnist_quick", *args, "--no-progress", "--out", trained)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    untrained = work / "untrained"
    train(load_config("mnist_quick", [*sets, "train.steps=1"]), untrained, progress=False)
    for out in (trained, untrained):
        assert (out / "checkpoints" / "best.pt").is_file()
    return {"trained": trained, "untrained": untrained}


def evaluate(run_cli, run) -> dict:
    proc = run_cli(
        "eval", run / "checkpoints" / "best.pt", "--json", "--iw-samples", "20", "--limit", "500",
        cwd=run,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_training_wrote_the_run(vae_runs):
    run = vae_runs["trained"]
    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [150, 300]
    assert all(math.isfinite(r["score"]) for r in valid)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_trained_beats_untrained(vae_runs, cli_in_process):
    run_cli = cli_in_process
    trained = evaluate(run_cli, vae_runs["trained"])
    untrained = evaluate(run_cli, vae_runs["untrained"])
    for r in (trained, untrained):
        assert r["kind"] == "vae"
        assert (r["dataset"], r["split"], r["flow"], r["k"]) == ("mnist", "test", "planar", 4)
        assert (r["iw_samples"], r["examples"]) == (20, 500)
        for key in ("neg_elbo", "nll", "nll_stderr"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["nll_stderr"] > 0
        assert 0 < r["nll"] <= r["neg_elbo"]  # the S-sample bound is tighter than the ELBO
    assert trained["step"] == TRAIN_STEPS and untrained["step"] == 1
    # An untrained decoder pays about 784·log 2 ≈ 543 nats; 300 steps take off well over 100.
    assert untrained["nll"] > 450
    assert trained["nll"] < untrained["nll"] - 100
    assert trained["neg_elbo"] < untrained["neg_elbo"]


def _png_size(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


def test_sample_outputs(vae_runs, cli_in_process):
    run_cli = cli_in_process
    run = vae_runs["trained"]
    best = run / "checkpoints" / "best.pt"

    proc = run_cli("sample", best, "--out", run / "g.png", "--n", "16", cwd=run)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(run / "g.png") == (4 * 30 + 2, 4 * 30 + 2)  # 4×4 tiles of 28 px + 2 px pad

    proc = run_cli("sample", best, "--reconstruct", "--out", run / "r.png", "--n", "16", cwd=run)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(run / "r.png") == (16 * 30 + 2, 2 * 30 + 2)  # 16 pairs, 16 per row

    proc = run_cli("sample", best, "--out", run / "s.npz", "--n", "16", cwd=run)
    assert proc.returncode == 0, proc.stderr
    with np.load(run / "s.npz") as data:
        assert sorted(data.files) == ["probs", "z"]
        z, probs = data["z"], data["probs"]
    assert z.shape == (16, 40)
    assert probs.reshape(16, -1).shape == (16, 784)
    assert np.isfinite(z).all() and ((probs >= 0) & (probs <= 1)).all()


def test_eval_says_whether_the_importance_weights_can_be_trusted(vae_runs, cli_in_process):
    run_cli = cli_in_process
    """Per-image Pareto k̂ and ESS summarised in the JSON, the PSIS estimate with --psis, and a
    warning on stderr exactly when many images have k̂ > 0.7."""
    run = vae_runs["trained"]
    proc = run_cli(
        "eval", run / "checkpoints" / "best.pt", "--json", "--iw-samples", "100", "--limit", "300",
        "--psis", cwd=run,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert 0 <= r["khat_over_0_7"] <= r["khat_over_0_5"] <= 1
    assert math.isfinite(r["khat_max"]) and r["khat_max"] > 0.5 * r["khat_over_0_5"]
    assert 1 <= r["ess_median"] <= 100
    assert r["ess_fraction_median"] == pytest.approx(r["ess_median"] / 100)
    # After 300 steps q is far too narrow for most images: smoothing their heavy tails moves
    # the estimate (tests/test_psis.py checks that a light tail leaves it alone).
    assert math.isfinite(r["nll_psis"])
    warned = "warning:" in proc.stderr and "k̂ > 0.7" in proc.stderr
    assert warned == (r["khat_over_0_7"] > 0.01), (r["khat_over_0_7"], proc.stderr)
    assert ("warning" in r) == warned


def test_report_shows_the_weight_diagnostics(vae_runs, cli_in_process, tmp_path):
    run_cli = cli_in_process
    run = vae_runs["trained"]
    proc = run_cli(
        "eval", run / "checkpoints" / "best.pt", "--json", "--iw-samples", "100", "--limit", "200",
        cwd=run,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run / "eval.json").write_text(proc.stdout)
    result = json.loads(proc.stdout)
    proc = run_cli("report", run, "--out", tmp_path / "r.md", "--plot", tmp_path / "k.png")
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "r.md").read_text()
    assert "k̂ > 0.7" in table and "median ESS" in table
    row = next(line for line in table.splitlines() if "| planar | 4 | test |" in line)
    assert f"{result['khat_over_0_7']:.1%}" in row and f"{result['ess_median']:.1f}" in row
    assert (tmp_path / "k.png").read_bytes()[:8] == PNG_MAGIC


def mnist_npz(path, mnist_dir, n_train: int, n_test: int):
    """The first MNIST images as a user's .npz (uint8 28×28): the sweep's mechanics on real
    digits, at a size whose evaluation at three S takes seconds, not a minute."""
    from flowvae.data.idx import read_idx

    train = read_idx(mnist_dir / "train-images-idx3-ubyte.gz")[:n_train].numpy()
    test = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[:n_test].numpy()
    np.savez(path, train=train, test=test)
    return path


#: test images of the sweep below
SWEEP_TEST = 400


def test_sweep_over_config_files_with_two_sample_sizes(tmp_path, mnist_dir, cli_in_process):
    run_cli = cli_in_process  # the CLI in this process: nine runs without nine start-ups
    """Rows that extend one base config, swept by file, each evaluated at S = 5 and S = 50 on the
    same test images: the larger S gives the tighter (lower) bound, and the report shows both."""
    data = mnist_npz(tmp_path / "digits.npz", mnist_dir, 2000, SWEEP_TEST)
    base = tmp_path / "base.yaml"
    base.write_text(
        "extends: mnist_quick\n"
        f"data: {{name: npz, root: {data}, valid_size: 200}}\n"
        "model: {hidden: [50]}\n"
        "train: {steps: 100, eval_every: 100, anneal: kl, anneal_steps: 50}\n"
    )
    rows = tmp_path / "rows"
    rows.mkdir()
    for name in ("planar", "nice"):
        (rows / f"{name}-k2.yaml").write_text(
            f"extends: ../base.yaml\nflow: {{name: {name}, k: 2}}\n"
        )
    args = ["sweep", "--config", rows / "planar-k2.yaml", "--config", rows / "nice-k2.yaml"]
    args += ["--out", tmp_path / "sweep", "--iw-samples", "5", "--iw-samples", "50"]
    proc = run_cli(*args, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("planar", "nice"):
        run = tmp_path / "sweep" / f"{name}-k2"
        result = json.loads((run / "eval.json").read_text())
        assert (result["flow"], result["k"], result["iw_samples"]) == (name, 2, 5)
        more = result["by_samples"]["50"]
        assert (
            (more["iw_samples"], more["examples"]) == (50, result["examples"]) == (50, SWEEP_TEST)
        )
        assert more["nll"] < result["nll"] - 3 * result["nll_stderr"] / 10
        saved = (run / "config.yaml").read_text()
        assert "- 50" in saved and "anneal: kl" in saved  # the base's keys under the row's own
    again = run_cli(*args, "--no-progress", cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count(": done") == 2, again.stderr
    # An eval.json from before per-image estimates were kept gets its headline S again (the
    # same numbers: the noise is fixed by the seed), and keeps the extra S it has.
    path = tmp_path / "sweep" / "planar-k2" / "eval.json"
    kept = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in kept.items() if k != "nll_per_image"}))
    old = run_cli(*args, "--no-progress", cwd=tmp_path)
    assert old.returncode == 0 and old.stderr.count(": done") == 1, old.stderr
    redone = json.loads(path.read_text())
    assert redone["nll"] == kept["nll"] and redone["by_samples"] == kept["by_samples"]
    assert redone["nll_per_image"] == kept["nll_per_image"]
    # A row whose config changed since its run is refused before anything runs, not reported
    # (or resumed) under the new config's name.
    row = rows / "nice-k2.yaml"
    row.write_text(row.read_text() + "train: {lr: 2.0e-3}\n")
    changed = run_cli(*args, "--no-progress", cwd=tmp_path)
    assert changed.returncode == 2 and ": done" not in changed.stderr, changed.stderr
    assert changed.stderr.strip().splitlines() == [changed.stderr.strip()], changed.stderr
    assert (
        "nice-k2 was trained with another config (train.lr (stored 0.001, asked 0.002))"
        in changed.stderr
    )
    # So is one trained for more updates than the config asks for: its numbers are not the
    # config's (and a cosine decay is laid out over the run's length).
    base.write_text(base.read_text().replace("steps: 100,", "steps: 50,"))
    shorter = run_cli(*args, "--no-progress", cwd=tmp_path)
    assert shorter.returncode == 2 and "(train.steps (stored 100, asked 50))" in shorter.stderr, (
        shorter.stderr
    )
    base.write_text(base.read_text().replace("steps: 50,", "steps: 100,"))
    row.write_text(row.read_text().replace("train: {lr: 2.0e-3}\n", ""))
    # A sample size asked for later is added to the finished runs, nothing else recomputed.
    before = json.loads((tmp_path / "sweep" / "nice-k2" / "eval.json").read_text())
    more = run_cli(*args, "--iw-samples", "20", "--no-progress", cwd=tmp_path)
    assert more.returncode == 0 and more.stderr.count(": trained") == 2, more.stderr
    after = json.loads((tmp_path / "sweep" / "nice-k2" / "eval.json").read_text())
    assert after["by_samples"]["50"] == before["by_samples"]["50"] and after["nll"] == before["nll"]
    assert after["by_samples"]["50"]["nll"] < after["by_samples"]["20"]["nll"] < after["nll"]
    report = run_cli("report", tmp_path / "sweep", "--out", tmp_path / "r.md", "--plot",
                     tmp_path / "f.png", cwd=tmp_path)  # fmt: skip
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "r.md").read_text()
    assert "−log p(x), S = 50" in text and text.count("| planar |") + text.count("| nice |") == 2
    # Both rows scored the same images with the same noise, so their per-image difference has
    # a far smaller standard error than the two rows' own errors combined.
    planar, nice = (json.loads((tmp_path / "sweep" / f"{n}-k2" / "eval.json").read_text())
                    for n in ("planar", "nice"))  # fmt: skip
    per_image = np.array(nice["nll_per_image"]) - np.array(planar["nll_per_image"])
    assert per_image.shape == (SWEEP_TEST,)
    assert per_image.mean() == pytest.approx(nice["nll"] - planar["nll"], abs=1e-3)
    paired = per_image.std(ddof=1) / math.sqrt(per_image.size)
    assert paired < 0.5 * math.hypot(nice["nll_stderr"], planar["nll_stderr"])
    row = next(line for line in text.splitlines() if line.startswith("| K = 2: nice → planar |"))
    assert f"| {per_image.mean():+.2f} ± {paired:.2f} |" in row, row
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_MAGIC
    # Settings are compared on validation images: the same runs, evaluated anew there.
    valid = run_cli(*args[:-4], "--iw-samples", "5", "--split", "valid", "--no-progress",
                    cwd=tmp_path)  # fmt: skip
    assert valid.returncode == 0 and valid.stderr.count(": trained") == 2, valid.stderr
    result = json.loads((tmp_path / "sweep" / "nice-k2" / "eval.json").read_text())
    assert (result["split"], result["examples"], result["iw_samples"]) == ("valid", 200, 5)


def test_sweep_names_runs_after_grid_points_or_config_files():
    from flowvae.errors import ConfigError
    from flowvae.sweep import plan

    one = plan(["a.yaml"], ["flow.k=0,10"])
    assert [p.name for _, p in one] == ["k0", "k10"]
    assert [p.name for _, p in plan(["rows/a.yaml"], [])] == ["a"]
    two = plan(["x/a.yaml", "x/b.yaml"], ["seed=0,1"])
    assert [(c, p.name, p.overrides) for c, p in two] == [
        ("x/a.yaml", "a-seed0", ["seed=0"]),
        ("x/a.yaml", "a-seed1", ["seed=1"]),
        ("x/b.yaml", "b-seed0", ["seed=0"]),
        ("x/b.yaml", "b-seed1", ["seed=1"]),
    ]
    with pytest.raises(ConfigError, match="share a file name"):
        plan(["x/a.yaml", "y/a.yaml"], [])


def test_report_sets_only_test_numbers_beside_the_papers():
    from flowvae.data import DATASETS
    from flowvae.tables import nll_table

    row = {"flow": "planar", "k": 10, "neg_elbo": 89.49, "nll": 86.30, "nll_stderr": 0.22}
    row |= {"iw_samples": 200, "info": {}}
    runs = [{**row, "run": "a", "split": "test"}, {**row, "run": "b", "split": "valid"}]
    table = nll_table(runs, DATASETS.get("mnist").paper).splitlines()
    test, valid = (next(line for line in table if line.startswith(f"| {r} |")) for r in "ab")
    assert "| ≤ 87.5 |" in test and "87.5" not in valid and "| valid |" in valid


def test_paired_table_compares_each_k_with_the_next_shorter_and_the_families_at_equal_k():
    from flowvae.tables import paired_table

    gen = np.random.default_rng(0)
    hard = gen.gamma(2.0, 10.0, size=400) + 60  # image difficulty, shared by every run

    def run(flow, k, gain, split="test"):
        nll = hard - gain + gen.normal(0, 0.5, size=hard.size)
        return {"flow": flow, "k": k, "split": split, "iw_samples": 200,
                "nll_per_image": nll.tolist()}  # fmt: skip

    rows = [run("planar", 0, 0.0), run("planar", 10, 1.0), run("planar", 20, 1.5)]
    rows += [run("nice", 10, 0.3), run("nice", 20, 0.6), run("nice", 20, 0.7)]  # two seeds
    rows += [run("planar", 10, 2.0, split="valid")]  # a lone validation run: no partner
    lines = paired_table(rows).splitlines()[2:]
    labels = [line.split(" | ")[0].lstrip("| ") for line in lines]
    assert labels == [
        "planar: K = 0 → 10", "planar: K = 10 → 20", "nice: K = 0 → 10", "K = 10: nice → planar"
    ]  # fmt: skip
    cells = {label: line.split(" | ")[3] for label, line in zip(labels, lines)}
    mean, stderr = (float(x) for x in cells["planar: K = 10 → 20"].split(" ± "))
    assert abs(mean - 0.5) < 3 * stderr and stderr < 0.1  # the shared difficulty cancels
    assert paired_table([rows[0]]) is None


def test_global_flow_layers_train_save_and_evaluate(tmp_path, mnist_dir, cli_in_process):
    run_cli = cli_in_process
    """flow.amortized: false — one NICE coupling net for all images, no flow head on the
    encoder — through train, the checkpoint and eval."""
    import torch

    out = tmp_path / "global"
    proc = run_cli(
        "train", "--config", "mnist_quick",
        "--set", f"data.root={mnist_dir}", "--set", "data.valid_size=1000",
        "--set", "model.hidden=[100]", "--set", "flow.name=nice", "--set", "flow.k=2",
        "--set", "flow.amortized=false", "--set", "train.steps=40",
        "--set", "train.eval_every=40", "--no-progress", "--out", out,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert not any(key.startswith("flow_head") for key in state)
    assert any(key.startswith("flow.layers.1.net") for key in state)
    # A global coupling net reads only its half of z: 20 inputs, no 40-dim context appended.
    assert state["flow.layers.0.net.0.weight"].shape[1] == 20
    r = evaluate(run_cli, out)
    assert (r["flow"], r["k"]) == ("nice", 2)
    assert math.isfinite(r["nll"]) and 0 < r["nll"] <= r["neg_elbo"]

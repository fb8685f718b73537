"""What each layer may know: the config needs no torch and no experiment module, only the
experiments compare experiment names or touch the VAE's flow head, and each experiment builds
its own optimiser groups and names the config sections it reads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch

from flowvae.catalog import EXPERIMENTS
from flowvae.config import load_config, to_dict
from flowvae.experiments import build

PACKAGE = Path(__file__).resolve().parents[1] / "flowvae"


def test_the_config_imports_neither_torch_nor_an_experiment():
    code = (
        "import sys, flowvae.config\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('flowvae.experiments')]\n"
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _outside_experiments() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts]


def test_no_experiment_name_is_compared_outside_the_experiments():
    names = set(EXPERIMENTS.names())
    found = []
    for path in _outside_experiments():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    if isinstance(side, ast.Constant) and side.value in names:
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, found


def test_only_the_vae_knows_the_flow_head():
    found = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "flow_head" in p.read_text(encoding="utf-8") and p.name != "vae.py"
    ]
    assert not found, found


def test_each_experiment_builds_its_parameter_groups():
    torch.manual_seed(0)
    density = build(load_config("energy", ["flow.k=2"]), torch.device("cpu"))
    (group,) = density.param_groups()
    assert group["lr"] == 1e-2 and len(group["params"]) == len(list(density.model.parameters()))


def test_a_run_writes_only_the_sections_its_experiment_reads():
    for name, experiment in (("energy", "density"), ("table2/planar-k20", "vae")):
        cfg = load_config(name)
        sections = {key for key, value in to_dict(cfg).items() if isinstance(value, dict)}
        assert sections == set(EXPERIMENTS.get(experiment).sections)

"""Model selection never sees the test set: with data.valid_size: 0 nothing is held out, so no
validation score chooses best.pt; it is the last checkpoint, the run says so, and the test
split is not read during training at all."""

from __future__ import annotations

import io
import json

import torch
from rich.console import Console

from flowvae import checkpoint, experiments
from flowvae.config import load_config
from flowvae.train import train


class NeverRead:
    """Stands in for the test split: any use of it fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the test split was read during training (.{name})")

    def __getitem__(self, index):
        raise AssertionError(f"the test split was read during training ([{index}])")


def test_without_a_validation_split_the_test_split_is_never_evaluated(
    tmp_path, mnist_dir, monkeypatch
):
    build = experiments.build

    def build_without_test(cfg, device):
        experiment = build(cfg, device)
        experiment.data.test = NeverRead()
        return experiment

    monkeypatch.setattr(experiments, "build", build_without_test)
    sets = [f"data.root={mnist_dir}", "data.valid_size=0", "flow.k=2", "model.hidden=[16]"]
    sets += ["train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2"]
    sets += ["train.lr_schedule=constant"]
    cfg = load_config("mnist_quick", [*sets, "train.steps=4"])
    console = Console(file=io.StringIO(), width=200)
    out = tmp_path / "run"
    result = train(cfg, out, console=console, progress=False, tensorboard=False)
    assert result.step == 4
    assert "no validation split (data.valid_size: 0): best.pt is the last checkpoint" in (
        console.file.getvalue()
    )
    best = checkpoint.load(out / "checkpoints" / "best.pt")
    last = checkpoint.load(out / "checkpoints" / "last.pt")
    assert best["step"] == last["step"] == 4
    for name, weights in last["model"].items():
        assert torch.equal(best["model"][name], weights), name
    splits = {json.loads(line)["split"] for line in (out / "metrics.jsonl").open()}
    assert splits == {"train"}  # no validation row, and none scored on test images
    # resumed for two more updates, best.pt follows the last weights again
    longer = load_config("mnist_quick", [*sets, "train.steps=6"])
    assert train(longer, out, resume=True, console=console, progress=False).step == 6
    best = checkpoint.load(out / "checkpoints" / "best.pt")
    assert best["step"] == checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 6

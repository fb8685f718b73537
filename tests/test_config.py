"""Config validation: every bad input fails through the real CLI with exit code 2, one line on
stderr naming the key or value, no traceback and nothing written; load_config's parsing rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from flowvae.config import Config, dump, load_config, shipped_configs
from flowvae.errors import ConfigError

ENERGY = "@energy"  # the shipped configs/energy.yaml
MISSING = "@missing"  # a config path that does not exist
FOLDER = "@folder"  # a config path that is a folder
NONE = "@none"  # no --config at all (defaults)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def case(name: str, config: str, args: list[str], fragments: list[str], marks=()):
    """One bad input: ``config`` is a marker above or the text of a YAML file to write, ``args``
    the extra CLI arguments, ``fragments`` what the one-line message must contain."""
    return pytest.param(config, args, fragments, id=name, marks=marks)


BAD_INPUTS = [
    case("missing-file", MISSING, [], ["nope.yaml", "does not exist"]),
    case("config-is-folder", FOLDER, [], ["is a folder"]),
    case(
        "yaml-syntax",
        "train:\n  lr: [1, 2\n  steps: 3\n",
        [],
        ["YAML syntax error", "line", "column"],
    ),
    case("top-level-list", "- train\n- flow\n", [], ["must hold a mapping", "list"]),
    case("unknown-top-key", "trian:\n  steps: 10\n", [], ["'trian'", "did you mean 'train'"]),
    case(
        "unknown-nested-key",
        ENERGY,
        ["--set", "train.lrr=0.1"],
        ["'train.lrr'", "did you mean 'train.lr'"],
    ),
    case("section-is-scalar", "flow: 3\n", [], ["flow", "must be a section"]),
    case(
        "steps-string", ENERGY, ["--set", "train.steps=abc"], ["train.steps", "'abc'", "an integer"]
    ),
    case("lr-list", ENERGY, ["--set", "train.lr=[1]"], ["train.lr", "[1]", "wrong type"]),
    case("k-fraction", ENERGY, ["--set", "flow.k=1.5"], ["flow.k", "1.5", "an integer"]),
    case("hidden-scalar", ENERGY, ["--set", "model.hidden=400"], ["model.hidden", "400", "a list"]),
    case("valid-size-bool", ENERGY, ["--set", "data.valid_size=true"], ["data.valid_size", "True"]),
    case(
        "compile-string",
        'train:\n  compile: "yes"\n',
        [],
        ["train.compile", "'yes'", "true or false"],
    ),
    case("k-negative", ENERGY, ["--set", "flow.k=-1"], ["flow.k", "-1", "out of range", ">= 0"]),
    case("lr-zero", ENERGY, ["--set", "train.lr=0"], ["train.lr", "out of range", "> 0"]),
    case(
        "lr-negative", ENERGY, ["--set", "train.lr=-1e-3"], ["train.lr", "-0.001", "out of range"]
    ),
    case("batch-zero", ENERGY, ["--set", "train.batch_size=0"], ["train.batch_size", "> 0"]),
    case("steps-zero", ENERGY, ["--set", "train.steps=0"], ["train.steps", "out of range"]),
    case("latent-zero", ENERGY, ["--set", "model.latent_dim=0"], ["model.latent_dim", "> 0"]),
    case("log-every-zero", ENERGY, ["--set", "train.log_every=0"], ["train.log_every", "> 0"]),
    case(
        "max-bad-zero", ENERGY, ["--set", "train.max_bad_steps=0"], ["train.max_bad_steps", "> 0"]
    ),
    case(
        "valid-size-negative",
        ENERGY,
        ["--set", "data.valid_size=-5"],
        ["data.valid_size", "-5", ">= 0"],
    ),
    case("no-config", NONE, [], ["train needs a config", "--config", "flowvae configs"]),
    case("seed-negative", ENERGY, ["--set", "seed=-1"], ["seed", "-1", ">= 0"]),
    case(
        "device-gpu", ENERGY, ["--device", "gpu"], ["device", "'gpu'", "choices: auto, cpu, cuda"]
    ),
    case(
        "optimizer-sgd",
        ENERGY,
        ["--set", "train.optimizer=sgd"],
        ["'sgd'", "adam, rmsprop"],
    ),
    case(
        "binarize", ENERGY, ["--set", "data.binarize=sometimes"], ["'sometimes'", "dynamic, static"]
    ),
    case(
        "experiment",
        ENERGY,
        ["--set", "experiment=density2"],
        ["'density2'", "did you mean 'density'"],
    ),
    case(
        "flow-typo", ENERGY, ["--set", "flow.name=plannar"], ["'plannar'", "did you mean 'planar'"]
    ),
    case("target-unknown", ENERGY, ["--set", "target.name=U5"], ["target.name", "'U5'", "U1, U2"]),
    case(
        "dataset-typo",
        ENERGY,
        ["--set", "experiment=vae", "--set", "data.name=mnistt"],
        ["data.name", "'mnistt'", "did you mean 'mnist'"],
    ),
    case(
        "likelihood-typo",
        ENERGY,
        ["--set", "experiment=vae", "--set", "model.likelihood=logit_norm"],
        ["model.likelihood", "'logit_norm'", "did you mean 'logit_normal'"],
    ),
    case(
        "anneal-kl-density",
        ENERGY,
        ["--set", "train.anneal=kl"],
        ["train.anneal", "density", "use joint"],
    ),
    case(
        "flow-lr-scale-density",
        ENERGY,
        ["--set", "train.flow_lr_scale=0.5"],
        ["train.flow_lr_scale", "amortised flow", "remove the key"],
    ),
    case("eps-zero", ENERGY, ["--set", "data.eps=0"], ["data.eps", "out of range", "> 0"]),
    case(
        "flow-option",
        ENERGY,
        ["--set", "flow.name=nice", "--set", "flow.options={hiden: [3]}"],
        ["flow.options.hiden", "'nice'", "did you mean 'hidden'"],
    ),
    case("set-without-equals", ENERGY, ["--set", "train.lr"], ["'train.lr'", "key=value"]),
    case("set-empty-key", ENERGY, ["--set", ".a=1"], ["'.a=1'", "empty key"]),
    case("set-through-value", ENERGY, ["--set", "train.lr.x=1"], ["train.lr is a value"]),
    case("cuda-absent", ENERGY, ["--device", "cuda"], ["cuda", "no CUDA device"], marks=no_cuda),
    case("resume-nothing", ENERGY, ["--resume"], ["--resume", "no checkpoint", "last.pt"]),
]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(("config", "args", "fragments"), BAD_INPUTS)
def test_bad_input_fails_cleanly(tmp_path, cli_in_process, config, args, fragments):
    check_bad_input(tmp_path, cli_in_process, config, args, fragments)


#: The same check through `python -m flowvae` in a fresh process, for one of the inputs
#: (tests/test_user_errors.py runs errors of other kinds so).
AS_A_PROCESS = [p for p in BAD_INPUTS if p.id == "flow-typo"]


@pytest.mark.parametrize(("config", "args", "fragments"), AS_A_PROCESS)
def test_bad_input_fails_cleanly_as_a_process(tmp_path, run_cli, config, args, fragments):
    check_bad_input(tmp_path, run_cli, config, args, fragments)


def check_bad_input(tmp_path, run_cli, config, args, fragments) -> None:
    cli_args = ["train"]
    if config == ENERGY:
        cli_args += ["--config", "energy"]
    elif config == MISSING:
        cli_args += ["--config", tmp_path / "nope.yaml"]
    elif config == FOLDER:
        (tmp_path / "a-folder").mkdir()
        cli_args += ["--config", tmp_path / "a-folder"]
    elif config != NONE:
        (tmp_path / "bad.yaml").write_text(config, encoding="utf-8")
        cli_args += ["--config", tmp_path / "bad.yaml"]
    out = tmp_path / "run"
    before = _files(tmp_path)

    proc = run_cli(*cli_args, *args, "--out", out, "--no-progress", cwd=tmp_path)

    message = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(message.splitlines()) == 1, proc.stderr
    assert message.startswith("error: ") and len(message) > len("error: "), message
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not out.exists()
    assert _files(tmp_path) == before  # nothing written anywhere (no default runs/ folder either)


# ----------------------------------------------------------------------------- load_config


def test_set_parses_yaml_lists():
    cfg = load_config("mnist_quick", ["model.hidden=[400,400]"])
    assert cfg.model.hidden == [400, 400]
    cfg = load_config(None, ["model.hidden=[300]"])
    assert cfg.model.hidden == [300]


def test_set_float_in_exponent_notation_is_a_float():
    cfg = load_config(None, ["train.lr=1e-3"])
    assert cfg.train.lr == 0.001
    assert type(cfg.train.lr) is float


def test_yaml_exponent_without_dot_is_accepted(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as the string "1e-3"; the float field accepts it.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  steps: 7\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.train.lr == 0.001
    assert type(cfg.train.lr) is float
    assert cfg.train.steps == 7


def test_overrides_apply_in_order_and_win_over_the_file():
    cfg = load_config("energy", ["flow.k=3", "flow.k=5", "target.name=U3"])
    assert (cfg.flow.k, cfg.target.name, cfg.flow.name) == (5, "U3", "planar")


def test_run_folder_config_round_trips(tmp_path):
    from flowvae.train import train

    cfg = load_config(
        "energy",
        [
            "device=cpu",
            "flow.k=2",
            "train.steps=2",
            "train.batch_size=16",
            "eval.valid_samples=64",
            "train.lr=3e-3",
        ],
    )
    result = train(cfg, tmp_path / "run", progress=False, tensorboard=False)
    assert result.step == 2
    written = tmp_path / "run" / "config.yaml"
    again = load_config(written)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("name", ["energy", "mnist", "mnist_quick"])
def test_dumped_config_round_trips(tmp_path, name):
    cfg = load_config(name, ["model.hidden=[16, 8]", "flow.k=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump(cfg), encoding="utf-8")
    assert load_config(path) == cfg
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize(
    "name, kept, left_out", [("energy", "target", "data"), ("mnist", "data", "target")]
)
def test_dumped_config_leaves_out_what_its_experiment_never_reads(name, kept, left_out):
    written = yaml.safe_load(dump(load_config(name)))
    assert kept in written and left_out not in written
    assert {"flow", "model", "train", "eval"} <= written.keys()


SHIPPED = sorted(shipped_configs())  # by name, as `--config NAME` finds them


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_builds_its_flow(name):
    from flowvae import flows

    cfg = load_config(name)
    dim = cfg.model.latent_dim if cfg.experiment == "vae" else 2
    amortized = cfg.experiment == "vae"
    stack = flows.build(cfg.flow.name, dim, cfg.flow.k, amortized=amortized, **cfg.flow.options)
    gen = torch.Generator().manual_seed(0)
    # Small random flow parameters, as a freshly initialised encoder head emits.
    params = 0.1 * torch.randn(3, stack.num_params, generator=gen) if stack.num_params else None
    z, log_det = stack(torch.randn(3, dim, generator=gen), params)
    assert z.shape == (3, dim) and torch.isfinite(z).all() and torch.isfinite(log_det).all()


def test_family_configs_cover_every_flow():
    from flowvae import flows

    names = {n.removeprefix("families/") for n in shipped_configs() if n.startswith("families/")}
    assert names == set(flows.available())
    for name in names:
        cfg = load_config(f"families/{name}")
        assert cfg.flow.name == name and cfg.flow.k == 10 and cfg.train.steps == 20000


def test_a_config_extends_another_key_by_key(tmp_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "base.yaml").write_text(
        "extends: mnist_quick\n"
        "train: {steps: 1234, anneal: kl}\nflow: {name: nice, options: {hidden: [8]}}\n"
    )
    (tmp_path / "rows" / "row.yaml").write_text("extends: ../base.yaml\nflow: {k: 3}\n")
    cfg = load_config(tmp_path / "rows" / "row.yaml", ["train.lr=0.01"])
    assert (cfg.flow.name, cfg.flow.k, cfg.flow.options) == ("nice", 3, {"hidden": [8]})
    assert (cfg.train.steps, cfg.train.anneal, cfg.train.lr) == (1234, "kl", 0.01)
    assert cfg.train.optimizer == "adam" and cfg.model.hidden == [400, 400]  # from mnist_quick


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("extends: loop.yaml\n", "leads back to itself"),
        ("extends: [a.yaml]\n", "extends must name one config"),
        ("extends: nowhere.yaml\n", "neither a file next to it nor a shipped config"),
    ],
)
def test_bad_extends_is_one_clear_error(tmp_path, text, fragment):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(tmp_path / "loop.yaml")


def test_printed_config_that_extends_another_stands_on_its_own(tmp_path, cli_in_process):
    proc = cli_in_process("configs", "table2/planar-k40")
    assert proc.returncode == 0, proc.stderr
    copy = tmp_path / "copy.yaml"
    copy.write_text(proc.stdout)
    assert "extends" not in yaml.safe_load(proc.stdout)
    assert load_config(copy) == load_config("table2/planar-k40")
    assert load_config(copy).flow.options == {"identity_init": True}

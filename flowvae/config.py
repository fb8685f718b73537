"""Typed run configuration: YAML (safe_load) + ``--set a.b=value`` overrides, validated.

Every error names the key, the value and what is allowed, in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowvae import plugins
from flowvae.catalog import DEFAULT_EXPERIMENT, EXPERIMENTS
from flowvae.errors import ConfigError
from flowvae.registry import unknown_name


def opt(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    choices: tuple | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with range/choice metadata used by validation."""
    meta = {"gt": gt, "ge": ge, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TargetConfig:
    name: str = opt(
        "U1",
        doc="2-D energy for the density experiment: U1, U2, U3 or U4, or your own "
        "(module:NAME, file.py:NAME; docs/extending.md)",
    )


@dataclass
class DataConfig:
    name: str = opt("mnist", doc="dataset for the VAE experiment (`flowvae list`)")
    root: str | None = opt(
        None,
        doc="folder with the dataset's files, or the .npz file for npz (default: "
        "$FLOWVAE_DATA/<name>, else ~/.cache/flowvae/<name>)",
    )
    binarize: str = opt(
        "dynamic",
        choices=("dynamic", "static"),
        doc="training pixels: fresh noise every batch (Bernoulli draws; dequantisation noise and "
        "patch positions for continuous data), or one seeded draw",
    )
    valid_size: int | None = opt(
        None,
        ge=0,
        doc="training images held out for model selection (null: the dataset's own split; 0: "
        "none, and best.pt is the last checkpoint)",
    )
    eps: float = opt(
        1e-3,
        gt=0,
        doc="continuous likelihoods: pixels are squeezed into (eps, 1 - eps), eps < 0.5, so "
        "their logits stay finite",
    )
    download: bool = opt(True, doc="download missing files from the public mirrors")


@dataclass
class FlowConfig:
    name: str = opt(
        "planar",
        doc="flow family (see `flowvae list`), or your own: module:Class, file.py:Class "
        "(docs/extending.md)",
    )
    k: int = opt(32, ge=0, doc="number of flow layers K (0 = no flow)")
    amortized: bool = opt(
        True,
        doc="VAE: the encoder produces each image's flow parameters (the paper's amortised "
        "flows); false learns one set shared by all images. Density fits are always global",
    )
    options: dict = opt({}, doc="family-specific options, e.g. {hidden: [64, 64]} for nice")


@dataclass
class ModelConfig:
    base: str = opt(
        "diagonal",
        choices=("standard", "diagonal", "uniform"),
        doc="density base q0: N(0, I), a learnable diagonal Gaussian, or a learnable uniform "
        "box U(μ - σ, μ + σ) starting at [-2, 2]² (log q = -inf outside it); density runs only, "
        "the VAE's q0(z|x) is its encoder's Gaussian",
    )
    hidden: list[int] = opt([400], doc="hidden widths of the VAE encoder and decoder MLPs")
    activation: str = opt(
        "maxout", choices=("maxout", "relu", "tanh", "softplus", "elu"), doc="MLP nonlinearity"
    )
    maxout_window: int = opt(4, gt=0, doc="pieces per maxout unit")
    latent_dim: int = opt(40, gt=0, doc="latent dimension D of the VAE")
    likelihood: str | None = opt(
        None,
        doc="p(x|z) of the VAE decoder (`flowvae list`; null: the dataset's default, bernoulli "
        "for binarised images, logit_normal for cifar10_patches)",
    )
    precision: str = opt(
        "float32",
        choices=("float32", "bf16"),
        doc="VAE encoder/decoder arithmetic: float32, or bf16 autocast (flows, log-dets and "
        "densities stay float32); bf16 pays on GPUs, not on most CPUs",
    )


@dataclass
class TrainConfig:
    steps: int = opt(20000, gt=0, doc="parameter updates")
    batch_size: int = opt(512, gt=0, doc="samples (density) or images (VAE) per update")
    lr: float = opt(1e-3, gt=0, doc="learning rate")
    flow_lr_scale: float = opt(
        1.0,
        gt=0,
        doc="multiplies lr for the encoder's flow head (amortised flows): a deep stack's map "
        "moves K times as far per update as one layer's",
    )
    optimizer: str = opt("adam", choices=("adam", "rmsprop"), doc="optimiser")
    momentum: float = opt(0.9, ge=0, doc="RMSprop momentum")
    lr_schedule: str = opt("constant", choices=("constant", "cosine"), doc="learning-rate schedule")
    anneal_steps: int = opt(0, ge=0, doc="β_t = min(1, 0.01 + t/anneal_steps); 0 = no annealing")
    anneal: str = opt(
        "joint",
        choices=("joint", "kl"),
        doc="what β_t weighs: all of log p(x, z_K) (the paper's), or only the KL term "
        "log q - log p(z) (VAE: a KL warm-up)",
    )
    grad_clip: float = opt(0.0, ge=0, doc="clip the gradient norm to this value (0 = off)")
    log_every: int = opt(100, gt=0, doc="steps between logged metrics")
    checkpoint_every: int = opt(1000, gt=0, doc="steps between checkpoints")
    eval_every: int = opt(1000, gt=0, doc="steps between validation evaluations (selects best.pt)")
    max_bad_steps: int = opt(20, gt=0, doc="consecutive non-finite steps before the run stops")
    compile: bool = opt(False, doc="torch.compile the model")


@dataclass
class EvalConfig:
    samples: int = opt(100000, gt=0, doc="samples for the density KL estimate")
    valid_samples: int = opt(20000, gt=0, doc="samples for the periodic density validation")
    iw_samples: int = opt(200, gt=0, doc="importance samples per image for -log p(x)")
    batch_size: int = opt(1000, gt=0, doc="VAE: images per pass of the periodic validation")


@dataclass
class Config:
    experiment: str = opt(
        DEFAULT_EXPERIMENT,
        doc="what is fitted: a 2-D energy or a flow VAE on a dataset (`flowvae list`)",
    )
    seed: int = opt(0, ge=0, doc="random seed")
    device: str = opt("auto", choices=("auto", "cpu", "cuda"), doc="where to train")
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# -- reading ------------------------------------------------------------------------------------

#: The configs shipped inside the package (a clone's top-level configs/ points here).
SHIPPED = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every shipped config: 'energy', 'mnist_quick', 'families/planar', ..."""
    files = sorted(SHIPPED.rglob("*.yaml"))
    return {p.relative_to(SHIPPED).with_suffix("").as_posix(): p for p in files}


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file's path: the path itself when it exists, else the shipped config of that
    name ('mnist_quick', 'mnist_quick.yaml' and 'configs/mnist_quick.yaml' all work)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = shipped_configs()
    name = path.as_posix().removeprefix("configs/").removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    subject = f"config {name_or_path} does not exist, as a file or as a shipped config"
    raise ConfigError(unknown_name(subject, name, list(shipped), "shipped configs"))


def read_yaml(path: str | Path) -> dict:
    path = resolve_config(path)
    if path.is_dir():
        raise ConfigError(
            f"config {path} is a folder — pass a YAML file such as configs/energy.yaml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys (got {type(data).__name__})"
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key=value, e.g. --set train.lr=1e-3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r} has an empty key — write e.g. --set flow.k=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: i + 1])
            raise ConfigError(f"--set {'.'.join(path)}: {dotted} is a value, not a section")
        node = child
    node[path[-1]] = value


# -- validation ---------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
    }
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(inner[0]) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    return names.get(tp, str(tp))


#: "No such value": what a scalar reader returns for a value of the wrong type.
_NO = object()


def _read_bool(v: Any) -> Any:
    return v if isinstance(v, bool) else _NO


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_int(v: Any) -> Any:
    if _is_number(v) and float(v).is_integer():
        return int(v)
    return _NO


def _read_float(v: Any) -> Any:
    if _is_number(v):
        return float(v)
    try:  # YAML 1.1 reads "1e-3" as a string
        return float(v) if isinstance(v, str) else _NO
    except ValueError:
        return _NO


def _read_str(v: Any) -> Any:
    return v if isinstance(v, str) else str(v) if _is_number(v) else _NO


def _read_dict(v: Any) -> Any:
    return v if isinstance(v, dict) else _NO


_SCALARS = {bool: _read_bool, int: _read_int, float: _read_float, str: _read_str, dict: _read_dict}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(value, inner, key)
    if origin is list:
        if not isinstance(value, list):
            raise _wrong_type(key, value, tp)
        return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    result = _SCALARS[tp](value)
    if result is _NO:
        raise _wrong_type(key, value, tp)
    return result


def _wrong_type(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(
        f"config key {key} = {value!r} has the wrong type: expected {_type_name(tp)}"
    )


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"config key {prefix.rstrip('.')} must be a section of keys, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            listed = f"keys in {prefix.rstrip('.')}" if prefix else "keys"
            subject = f"unknown config key '{prefix}{key}'"
            raise ConfigError(unknown_name(subject, key, list(fields), listed, prefix))
        f, tp = fields[key], hints[key]
        full = prefix + key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full + ".")
            continue
        v = _coerce(value, tp, full)
        _check_range(full, v, f.metadata)
        kwargs[key] = v
    return cls(**kwargs)


def _check_range(key: str, value: Any, meta: Any) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            unknown_name(f"config key {key} = {value!r} is not allowed", value, choices)
        )
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("gt") is not None and not v > meta["gt"]:
            raise ConfigError(
                f"config key {key} = {value!r} is out of range: must be > {meta['gt']}"
            )
        if meta.get("ge") is not None and not v >= meta["ge"]:
            raise ConfigError(
                f"config key {key} = {value!r} is out of range: must be >= {meta['ge']}"
            )


def _check_names(cfg: Config) -> None:
    """Names that refer to registries, checked here so a typo fails before anything runs."""
    from flowvae import flows
    from flowvae.data import DATASETS
    from flowvae.likelihoods import LIKELIHOODS
    from flowvae.targets import TARGETS

    for key, name, registry in (
        ("experiment", cfg.experiment, EXPERIMENTS),
        ("flow.name", cfg.flow.name, flows.FLOWS),
        ("target.name", cfg.target.name, TARGETS),
        ("data.name", cfg.data.name, DATASETS),
        ("model.likelihood", cfg.model.likelihood, LIKELIHOODS),
    ):
        if name is not None and name not in registry:
            subject = f"config key {key} = {name!r} is unknown"
            raise ConfigError(unknown_name(subject, name, registry.names()))
    experiment = EXPERIMENTS.get(cfg.experiment)
    anneals = experiment.anneals
    if cfg.train.anneal not in anneals:
        raise ConfigError(
            f"config key train.anneal = {cfg.train.anneal!r} does not apply to the "
            f"{cfg.experiment} experiment — use {' or '.join(anneals)}"
        )
    allowed = flows.option_names(cfg.flow.name)
    for key in cfg.flow.options:
        if key not in allowed:
            subject = f"config key flow.options.{key} is not an option of flow '{cfg.flow.name}'"
            raise ConfigError(unknown_name(subject, key, allowed, "options"))
    experiment.check_config(cfg)


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    _check_names(cfg)
    return cfg


def read_config(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's keys on top of those of the config it ``extends`` (a path relative to
    the file, or a shipped config's name), so a family of configs states only what differs."""
    data = read_yaml(path)
    here = resolve_config(path).resolve()
    plugins.absolute_names(data, here.parent)  # a flow file beside the config
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(
            f"config file {here}: extends must name one config, e.g. extends: table2/base.yaml"
        )
    relative = here.parent / parent
    shipped = shipped_configs().get(parent.removesuffix(".yaml"))
    base = relative if relative.is_file() else shipped
    if base is None:
        raise ConfigError(
            f"config file {here}: extends {parent}, which is neither a file next to it nor a "
            "shipped config (`flowvae configs` lists them)"
        )
    base = base.resolve()
    if base in (*seen, here):
        raise ConfigError(f"config file {here}: extends {parent} leads back to itself")
    return merge(read_config(base, (*seen, here)), data)


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = merge(out[key], value)
        out[key] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply ``a.b=value`` overrides, validate."""
    data = read_config(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    plugins.absolute_names(data, Path.cwd())  # --set flow.name=file.py:Class
    return from_dict(data)


def to_dict(cfg: Config) -> dict:
    """The config as plain data, with only the sections its experiment reads (a VAE run's
    config naming a 2-D energy would only mislead)."""
    used = EXPERIMENTS.get(cfg.experiment).sections
    hints = typing.get_type_hints(Config)
    return {
        key: value
        for key, value in dataclasses.asdict(cfg).items()
        if key in used or not dataclasses.is_dataclass(hints[key])
    }


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe() -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for every config key, as `flowvae keys` lists them."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc += f" (one of: {', '.join(f.metadata['choices'])})"
            rows.append((prefix + f.name, repr(default), doc))

    walk(Config, "")
    return rows

"""What ``--resume`` continues: the run its folder holds, exactly as its config.yaml says.

A resumed run takes every key from the folder. A ``--config`` or ``--set`` given with it may
only repeat the stored values, with two exceptions (``CONTINUABLE``): the device it runs on, and
``train.steps`` growing under a constant learning rate, which makes the run longer with no other
change (a cosine decay is laid out over train.steps, so a longer one is another schedule from
the first update on and is refused). `flowvae sweep` judges the run folders it continues by the
same rule.
"""

from __future__ import annotations

from pathlib import Path

from flowvae import checkpoint, plugins
from flowvae.config import (
    Config,
    apply_override,
    from_dict,
    parse_override,
    read_config,
    read_yaml,
    to_dict,
)
from flowvae.errors import ConfigError

#: What a continued run may change: the device it runs on, and its length when that only adds
#: updates (see config_changes).
CONTINUABLE = frozenset({"train.steps", "device"})


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def stored_config(run_dir: Path) -> dict | None:
    """The config a run folder was trained with (config.yaml, else the copy in its newest
    intact checkpoint), or None."""
    path = run_dir / "config.yaml"
    if path.exists():
        return read_yaml(path)
    found = checkpoint.newest_intact(run_dir / "checkpoints")
    return None if found is None else found.ckpt["config"]


def config_changes(run_dir: Path, cfg: Config) -> list[str]:
    """'key (stored S, asked A)' wherever the config a run folder was trained with differs
    from ``cfg`` outside CONTINUABLE: a run continued under another config would be a run of
    neither."""
    data = stored_config(run_dir)
    if data is None:
        return []
    saved = _flat(to_dict(from_dict(data)))  # defaults filled, as for ``cfg``
    new = _flat(to_dict(cfg))
    keys = sorted((saved.keys() | new.keys()) - CONTINUABLE)
    changes = [_change(k, saved.get(k), new.get(k)) for k in keys if saved.get(k) != new.get(k)]
    before, after = saved["train.steps"], new["train.steps"]
    # A run trained past the config's length is not a run of it, and a cosine decay is laid out
    # over train.steps: a longer one is another schedule from the first update on.
    if before != after and (after < before or new["train.lr_schedule"] == "cosine"):
        changes.append(_change("train.steps", before, after))
    return changes


def _change(key: str, stored, asked) -> str:
    return f"{key} (stored {stored!r}, asked {asked!r})"


def resume_config(
    run_dir: Path, config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """The config ``train --resume`` runs: RUN/config.yaml, or ``config`` when one is given,
    with ``overrides`` on top; refused unless it continues the stored run (check_resume)."""
    data = read_config(config) if config is not None else stored_config(run_dir)
    if data is None:  # train() says that there is nothing to resume
        data = {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    plugins.absolute_names(data, Path.cwd())  # --set flow.name=file.py:Class, as train reads it
    cfg = from_dict(data)
    check_resume(run_dir, cfg)
    return cfg


def check_resume(run_dir: Path, cfg: Config) -> None:
    """Refuse, in one line naming every changed key, a resume that would change the run."""
    changes = config_changes(run_dir, cfg)
    if changes:
        raise ConfigError(
            f"--resume continues {run_dir} as its config.yaml says; refusing to change "
            f"{'; '.join(changes)} — drop those --config/--set values (only --device, and "
            "train.steps growing under a constant lr_schedule, may differ), or train a new run "
            "with another --out"
        )

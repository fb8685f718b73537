"""Registry entries from outside the package: flows (and 2-D targets) that users write.

A name in a registry that has a :class:`PluginSource` may also be

- ``module.path:Name``: an attribute of an importable module;
- ``path/to/file.py:Name``: an attribute of a Python file (a config resolves a relative path
  against its own folder, ``--set`` against the working directory: see :func:`absolute`);
- the name of an entry point in the source's group (``flowvae.flows``, ``flowvae.targets``)
  that an installed package declares, the Python packaging convention.

Each is imported on first use and remembered for the process, so a checkpoint whose config
names one imports it again in a new process. This module imports no torch: config reading
stays light, and the objects are checked by the registry's own ``check``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from flowvae.errors import ConfigError
from flowvae.registry import suggest


class PluginError(ConfigError):
    """A plugin name whose module, file, attribute or entry point cannot be loaded."""


#: Config keys whose value may name a plugin (their registries have a PluginSource).
PLUGIN_KEYS = (("flow", "name"), ("target", "name"))


def is_spec(name: object) -> bool:
    """True for 'module:Name' and 'file.py:Name' (plain registry names have no colon)."""
    return isinstance(name, str) and ":" in name


def is_file_spec(name: object) -> bool:
    return is_spec(name) and name.rpartition(":")[0].endswith(".py")


def absolute(name: Any, base: str | Path) -> Any:
    """A file spec with its path made absolute against ``base`` (the folder of the config that
    states it, or the working directory for ``--set``); any other value unchanged. Configs and
    checkpoints store the absolute form, so a run can be evaluated from any folder."""
    if not is_file_spec(name):
        return name
    path, _, attr = name.rpartition(":")
    full = Path(base) / Path(path).expanduser()  # an absolute path replaces base
    return f"{os.path.abspath(full)}:{attr}"


def absolute_names(data: dict, base: str | Path) -> None:
    """Make the file specs of config ``data`` (flow.name, target.name) absolute, in place."""
    for section, key in PLUGIN_KEYS:
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = absolute(node[key], base)


def short(name: str) -> str:
    """A spec's attribute name ('Affine' for '/x/flows.py:Affine'), for folder names."""
    return name.rpartition(":")[2] if is_spec(name) else name


@dataclass(frozen=True)
class Loaded:
    obj: Any
    origin: str  # "module m", "file /abs/f.py", "entry point n = m:A (package p 1.0)"


class PluginSource:
    """Resolves plugin names for one registry: ``check(obj)`` says why an object does not fit
    (None when it does)."""

    def __init__(self, kind: str, group: str, check: Callable[[Any], str | None]) -> None:
        self.kind, self.group, self.check = kind, group, check
        self._loaded: dict[str, Loaded] = {}

    def entry_points(self) -> dict[str, metadata.EntryPoint]:
        """The installed entry points of the group, by name (first one wins on a clash)."""
        found: dict[str, metadata.EntryPoint] = {}
        for ep in metadata.entry_points(group=self.group):
            found.setdefault(ep.name, ep)
        return found

    def find(self, name: str) -> Any | None:
        """The object ``name`` stands for, None when it is neither a spec nor an entry point;
        PluginError (one line) when it is one that cannot be loaded."""
        if not isinstance(name, str):
            return None
        key = absolute(name, Path.cwd())
        if key not in self._loaded:
            loaded = self._load(name, key)
            if loaded is None:
                return None
            problem = self.check(loaded.obj)
            if problem:
                raise PluginError(f"{self.kind} '{name}' ({loaded.origin}) {problem}")
            self._loaded[key] = loaded
        return self._loaded[key].obj

    def origin(self, name: str) -> str | None:
        """Where a plugin name was loaded from (after ``find``), else None."""
        loaded = self._loaded.get(absolute(name, Path.cwd()))
        return loaded.origin if loaded else None

    def _load(self, name: str, key: str) -> Loaded | None:
        if is_spec(key):
            where, _, attr = key.rpartition(":")
            if is_file_spec(key):
                module, origin = self._import_file(name, Path(where)), f"file {where}"
            else:
                module, origin = self._import_module(name, where), f"module {where}"
            return Loaded(self._attribute(name, module, attr, origin), origin)
        ep = self.entry_points().get(name)
        if ep is None:
            return None
        origin = entry_point_origin(ep)
        try:
            return Loaded(ep.load(), origin)
        except Exception as exc:  # noqa: BLE001  (any import failure is the plugin's, said in one line)
            raise PluginError(
                f"{self.kind} '{name}' ({origin}) cannot be loaded: {_why(exc)}"
            ) from None

    def _import_module(self, name: str, module: str) -> Any:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise PluginError(
                f"{self.kind} '{name}': no module named '{exc.name}' — install it or put its "
                "folder on PYTHONPATH"
            ) from None
        except Exception as exc:  # noqa: BLE001
            raise PluginError(
                f"{self.kind} '{name}': importing {module} failed: {_why(exc)}"
            ) from None

    def _import_file(self, name: str, path: Path) -> Any:
        if not path.is_file():  # the path shown is absolute: where it was looked for
            raise PluginError(f"{self.kind} '{name}': file {path} does not exist")
        # One module per file, named after its path: imported once, and found again by pickle.
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        stem = re.sub(r"\W", "_", path.stem)
        module_name = f"flowvae_plugin_{stem}_{digest}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001
            del sys.modules[module_name]
            raise PluginError(
                f"{self.kind} '{name}': importing {path} failed: {_why(exc)}"
            ) from None
        return module

    def _attribute(self, name: str, module: Any, attr: str, origin: str) -> Any:
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                public = [n for n in vars(module) if not n.startswith("_")]
                raise PluginError(
                    f"{self.kind} '{name}': {origin} has no attribute '{attr}'"
                    + suggest(part, public)
                )
            obj = getattr(obj, part)
        return obj


def _why(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def origin(registry: Any, name: str) -> str:
    """Where a registry entry comes from, as `flowvae list` shows it: built-in, a module that
    registered it on import, an entry point (with its package), or a module or file spec."""
    source = getattr(registry, "plugins", None)
    if name not in registry.names():  # a spec
        registry.get(name)
        return source.origin(name)
    if registry.is_registered(name):
        module = getattr(registry.get(name), "__module__", None) or "flowvae"
        return "built-in" if module.split(".")[0] == "flowvae" else f"module {module}"
    return entry_point_origin(source.entry_points()[name])


def entry_point_origin(ep: metadata.EntryPoint) -> str:
    dist = f"package {ep.dist.name} {ep.dist.version}" if ep.dist else "an installed package"
    return f"entry point {ep.value} ({dist})"


def sources(cfg: Any) -> dict[str, str]:
    """Where the run's flow (and target) come from, for its checkpoints: the config holds the
    name that imports them again, this says what that was when the run was trained."""
    from flowvae.experiments import EXPERIMENTS
    from flowvae.flows import FLOWS
    from flowvae.targets import TARGETS

    found = {"flow.name": origin(FLOWS, cfg.flow.name)}
    if "target" in EXPERIMENTS.get(cfg.experiment).sections:
        found["target.name"] = origin(TARGETS, cfg.target.name)
    return found

"""Run-folder bookkeeping: its default name, a write check before training, run.json, the
metrics log (metrics.jsonl + TensorBoard), what `flowvae verify` checks, and the clean-up of
temporary files that a killed writer left."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from flowvae import __version__, checkpoint
from flowvae.checkpoint import Row
from flowvae.errors import ConfigError, TrainingError
from flowvae.runlock import holder, pid_alive


def default_out_dir(cfg) -> Path:
    from flowvae.experiments import EXPERIMENTS
    from flowvae.plugins import short

    what = short(EXPERIMENTS.get(cfg.experiment).label(cfg))  # 'Ring' for 'targets.py:Ring'
    return Path("runs") / f"{what}-{short(cfg.flow.name)}-k{cfg.flow.k}-s{cfg.seed}"


def check_output_folder(out_dir: Path, need_bytes: int) -> None:
    """Fail before training if the run folder cannot be written or the disk is nearly full."""
    try:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the output folder {out_dir} ({exc.strerror or exc}) — choose "
            "another with --out"
        ) from None
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise ConfigError(
            f"only {free / 2**20:.1f} MiB free in {out_dir}, checkpoints need about "
            f"{need_bytes / 2**20:.1f} MiB — free some space or choose another folder with --out"
        )


def checkpoint_bytes(model: torch.nn.Module) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * 3 * n + 8 * 2**20  # last + best, each with two optimiser moments, plus slack


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """checkpoint.save_atomic, with a failed write (full disk, lost mount) as one line."""
    try:
        checkpoint.save_atomic(obj, path)
    except OSError as exc:
        kept = "the previous checkpoint is intact" if path.exists() else "no earlier one exists"
        raise TrainingError(
            f"could not write checkpoint {path}: {exc.strerror or exc} — free space on that disk "
            f"or choose another folder with --out (then --resume); {kept}"
        ) from None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def write_run_info(out_dir: Path, device: torch.device, step: int, seconds: float) -> None:
    """run.json: what ran where and for how long (read by `flowvae report`)."""
    info = {
        "steps": step,
        "train_seconds": seconds,
        "device": device.type,
        "hardware": hardware_name(device),
        "torch": torch.__version__,
        "flowvae": __version__,
    }
    checkpoint.write_text_atomic(out_dir / "run.json", json.dumps(info, indent=1) + "\n")


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard scalars and images."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        except OSError as exc:
            raise TrainingError(
                f"could not write {self.path}: {exc.strerror or exc} — free space on that disk "
                "or choose another folder with --out"
            ) from None
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def images(self, step: int, images: dict[str, Any]) -> None:
        if self.writer is not None:
            for key, img in images.items():
                self.writer.add_image(key, img, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _step_of(line) <= step]
    checkpoint.write_text_atomic(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# -- verifying ------------------------------------------------------------------------------------


def verify(path: str | Path) -> list[Row]:
    """Rows for a checkpoint file, or for a run folder: its checkpoints (last.pt and best.pt
    always listed), config.yaml, run.json, eval.json and metrics.jsonl, stale temporary files,
    and a live writer if there is one. Reads only; never repairs or locks."""
    path = Path(path)
    if not path.is_dir():
        return [checkpoint.check(path)]
    ckpt_dir = path / "checkpoints"
    names = {"last.pt", "best.pt"}
    if ckpt_dir.is_dir():
        names |= {p.name for p in ckpt_dir.glob("*.pt")}
    rows = [checkpoint.check(ckpt_dir / name) for name in sorted(names, key=_checkpoint_order)]
    rows.append(_check_text(path / "config.yaml", _parse_yaml))
    rows.append(_check_text(path / "run.json", _parse_json, missing="written when training ends"))
    for name, parse in (("eval.json", _parse_json), ("metrics.jsonl", _parse_jsonl)):
        if (path / name).exists():
            rows.append(_check_text(path / name, parse))
    rows += [
        Row(tmp, "stale", "temporary file of a write cut short; safe to delete")
        for tmp in stale_temps(path)
    ]
    info = holder(path)
    if info is not None:
        rows.append(Row(path / ".lock", "busy", f"being written by pid {info['pid']}"))
    return rows


def _checkpoint_order(name: str) -> tuple[int, str]:
    return ({"last.pt": 0, "best.pt": 1}.get(name, 2), name)


def _check_text(path: Path, parse: Callable[[str], str | None], missing: str = "") -> Row:
    if not path.exists():
        return Row(path, "missing", missing or "no such file")
    try:
        problem = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"unreadable ({exc})"
    return Row(path, "corrupt", problem) if problem else Row(path, "ok", "parses")


def _parse_yaml(text: str) -> str | None:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return "not valid YAML: " + " ".join(str(exc).split())[:160]
    return None if isinstance(data, dict) else "not a YAML mapping"


def _parse_json(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    return None if isinstance(data, dict) else "not a JSON object"


def _parse_jsonl(text: str) -> str | None:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and _parse_json(line):
            return f"line {number} is not a JSON object (a write cut short?)"
    return None


# -- temporary files ------------------------------------------------------------------------------


def stale_temps(run_dir: str | Path) -> list[Path]:
    """Temporary files of atomic writes whose writer no longer runs, in the run folder and its
    checkpoints/ folder. A live writer's (this process's included) are in flight, not stale."""
    found = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = checkpoint.TEMP_NAME.match(p.name)
            if m and p.is_file() and not pid_alive(int(m["pid"])):
                found.append(p)
    return found


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete what ``stale_temps`` finds (a killed writer's leftovers); return what was removed."""
    removed = []
    for p in stale_temps(run_dir):
        try:
            p.unlink()
        except FileNotFoundError:  # another cleaner got there first
            continue
        removed.append(p)
    return removed

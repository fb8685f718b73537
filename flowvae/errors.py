"""User-facing errors: one line, what is wrong and how to fix it."""

from pathlib import Path


class FlowvaeError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 2."""

    exit_code = 2


class ConfigError(FlowvaeError):
    """A config key, value or file is wrong."""


class DataError(FlowvaeError):
    """A dataset file is missing, truncated or corrupted."""


class CheckpointError(FlowvaeError):
    """A checkpoint cannot be read or does not belong to flowvae."""


class TrainingError(FlowvaeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving last.pt (exit code 128 + signal)."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = signum, step, path
        self.exit_code = 128 + signum
        self.resume_hint = "the same command plus --resume"  # `flowvae sweep` says its own
        super().__init__(f"interrupted at step {step}")


class RunFolderBusy(FlowvaeError):
    """Another flowvae process holds the run folder's lock (it is writing into that folder)."""

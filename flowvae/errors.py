"""User-facing errors: one line, what is wrong and how to fix it."""


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

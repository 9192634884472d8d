"""User-facing errors: each message says what was wrong, where, and what to do."""

from __future__ import annotations


class EfficientLLaVAError(Exception):
    """Base class of errors the CLI prints as one line (no traceback)."""


class ConfigError(EfficientLLaVAError):
    """A YAML file, a policy or a CLI argument is malformed."""


class ModelLoadError(EfficientLLaVAError):
    """A model spec cannot be resolved to a LLaVA checkpoint."""


class DataError(EfficientLLaVAError):
    """A data set cannot be loaded or does not have the expected layout."""


class PolicyError(ConfigError):
    """A pruning policy does not fit the model or the search space."""


class ResourceError(EfficientLLaVAError):
    """A request for resources (GPUs, CPUs, storage) that the cluster cannot satisfy."""


class DamagedFileError(EfficientLLaVAError):
    """A file of an experiment directory cannot be read or parsed (truncated, garbled, unreadable)."""

    def __init__(self, path: object, what: str, todo: str) -> None:
        super().__init__(f"{path}: {what}; {todo}")
        self.path = path


class DiskFullError(EfficientLLaVAError):
    """A write failed because the disk (or a quota) is full; the directory stays resumable."""

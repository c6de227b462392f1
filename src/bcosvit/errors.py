"""Errors raised for bad user input; each message says what was wrong and what to do."""


class BcosVitError(Exception):
    """Base class of every error bcosvit raises on purpose."""


class InputError(BcosVitError, ValueError):
    """Images that do not fit the model (shape, channel count, size, NaN/Inf values)."""


class ConfigError(BcosVitError, ValueError):
    """An unknown model name, option or an invalid configuration value."""


class CheckpointError(BcosVitError, ValueError):
    """A weights file that is missing, corrupt or does not match the model."""


class DataError(BcosVitError, FileNotFoundError):
    """A dataset that is missing or unreadable."""

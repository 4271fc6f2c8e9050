"""Errors a user can cause or fix; the CLI prints them as one line, tracebacks are for bugs."""


class CodecError(Exception):
    """Base class: `str(error)` is the whole message a user sees (what, where, what to do)."""


class SeedFileError(CodecError):
    """The seed file is missing, unreadable, empty or has invalid rows."""


class ConfigError(CodecError):
    """A setting has an invalid value or the config file cannot be read."""


class ModelError(CodecError):
    """A model cannot be used: unknown model string, missing API key, unreachable endpoint."""


class BenchmarkError(CodecError):
    """A benchmark cannot be loaded or has nothing to evaluate."""


class ParseError(ValueError):
    """Model output does not have the expected format; the gateway retries, then records a failed call."""


class DatasetError(CodecError):
    """A dataset failed validation before publishing; nothing was published."""

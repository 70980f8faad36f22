"""Errors that the command line reports as one clear message instead of a traceback."""


class SslKvasirError(Exception):
    """Base class: bad input or configuration that the user can fix."""


class DataError(SslKvasirError, ValueError):
    """An archive, split file, cache or prediction file that does not fit what is expected."""


class ConfigError(SslKvasirError, ValueError):
    """A configuration value that cannot work (unknown name, value out of range, ...)."""

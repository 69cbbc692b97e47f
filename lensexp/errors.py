"""One exception type for bad user input (configs, files, parameter ranges)."""


class ConfigError(ValueError):
    """Raised with one clear message naming the offending option, file or value."""

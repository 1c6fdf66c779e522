"""User-facing error types: each message names the file, field or value at fault."""


class FastServeError(Exception):
    """An error caused by the user's input; the CLI prints it and exits with status 2."""


class ConfigError(FastServeError, ValueError):
    """A configuration value or key is invalid."""


class ModelDirError(FastServeError):
    """A model directory is missing, incomplete, altered or inconsistent."""


class DataError(FastServeError):
    """A corpus or prepared data directory is missing, empty or malformed."""


class TokenizerError(FastServeError):
    """A tokenizer file is missing, malformed or does not fit the model."""

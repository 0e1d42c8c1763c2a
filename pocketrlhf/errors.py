"""User-facing errors: the CLI prints them as one line (no traceback) and exits with status 2."""


class PocketError(Exception):
    """A problem with the user's input, config, data or model, explained in the message."""


class ConfigError(PocketError, ValueError):
    """A mistake in a config file or on the command line."""


class DataError(PocketError, ValueError):
    """Bad input data; the message names the file, line or row, and column."""


class ModelLoadError(PocketError, RuntimeError):
    """A base model or adapter that cannot be loaded, and why."""


class NonFiniteError(PocketError, ArithmeticError):
    """A NaN or infinite reward, loss or gradient stopped training; the message names its source."""


class RewardFunctionError(PocketError, RuntimeError):
    """A user's reward function raised or returned something other than one number per response."""

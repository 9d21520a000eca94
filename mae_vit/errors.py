"""User-facing errors.

Everything a user can get wrong (a config key, a data path, a checkpoint file) raises a subclass of
`UserError`. The tools catch it, print its message as one paragraph and exit with status 2, so that
a typo never ends in a traceback and never writes anything.
"""


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback (exit status 2)."""


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type or an invalid combination of values."""


class DataError(UserError):
    """A data path that does not exist, matches no shard, or holds no usable samples."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is unsafe to unpickle, or does not fit the model."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss at optimizer step `step`; the last good checkpoint is untouched."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step


class StoppedBySignal(Exception):
    """SIGTERM / SIGUSR1 stopped training after a checkpoint was saved: re-run to resume (exit status 75)."""


EXIT_STOPPED = 75  # EX_TEMPFAIL: a temporary failure, the same command resumes

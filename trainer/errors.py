"""User-facing errors: one base class, so the CLI can tell a user's mistake from a bug.

``scripts/train.py`` prints a ``UserError`` as one ``error: ...`` line and exits; any other
exception keeps its traceback (a bug in a kernel or in the trainer must never look like a typo).
Each message says what is wrong and how to fix it. The concept packages (models, kernels,
trainer.optim) raise standard exceptions or their own (``kernels.UnavailableError``), which the
CLI maps to the same one-line form (``USER_ERRORS``).
"""


class UserError(Exception):
    """Something the user can fix: a setting, a file, a checkpoint, the environment."""


class ConfigError(UserError, ValueError):
    """A setting that is missing, of the wrong type, out of range, or inconsistent with another."""


class DataError(UserError, ValueError):
    """Unusable data (missing, empty, not text, wrong format), with the remedy."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used, with the reason and the remedy."""


class TrainingError(UserError, RuntimeError):
    """A run that had to stop (diverged, bad resume); the message says why and what is kept."""


class OutputError(UserError, OSError):
    """The run directory or a file in it cannot be created or written (permissions, a file in the
    way, a full disk, another process holding the run)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Every exception type that is the user's to fix: ours, the attention kernels' (an
    implementation that cannot run here or does not support an input), and OmegaConf's (a
    mandatory value left at ???, an interpolation or value the config cannot resolve)."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

    from kernels import UnavailableError, UnsupportedError

    return UserError, UnavailableError, UnsupportedError, MissingMandatoryValue, InterpolationResolutionError, ValidationError

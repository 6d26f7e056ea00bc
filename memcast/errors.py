"""Errors a user of the ``memcast`` command can act on.

The command prints these as one line (``memcast pretrain: error: ...``) and exits with code 2,
like argparse does for a bad flag; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from models.base import ModelCapabilityError
from models.checkpoint import CheckpointError
from models.config import ConfigError
from models.state_io import FingerprintMismatchError, StateFormatError


class CliError(ValueError):
    """A command line that cannot run as given (a missing flag, a path that is not there)."""


# the domain errors of each package; trainer's are added by memcast.cli (importing trainer
# here would load pandas for every command)
USER_ERRORS: tuple[type[Exception], ...] = (
    CliError,
    ConfigError,
    CheckpointError,
    ModelCapabilityError,
    StateFormatError,
    FingerprintMismatchError,
)

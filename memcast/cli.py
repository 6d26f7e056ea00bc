"""The ``memcast`` console command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from memcast import __version__


def build_parser() -> argparse.ArgumentParser:
    # Imported here so `memcast --version` stays fast and each package owns its subcommands.
    from memcast import replay
    from service import cli as service_cli
    from trainer import cli as trainer_cli

    parser = argparse.ArgumentParser(prog="memcast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"memcast {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    trainer_cli.register(sub)
    service_cli.register(sub)
    replay.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format='{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "message": %(message)r}',
    )
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        sys.stderr.write(f"memcast {args.command}: error: {exc}\n")
        return 2


def user_errors() -> tuple[type[Exception], ...]:
    """Domain errors that end a command with a one-line message and exit code 2."""
    from memcast.errors import USER_ERRORS
    from trainer.data import DataError
    from trainer.methods import MethodError
    from trainer.train_config import TrainConfigError

    return (*USER_ERRORS, DataError, MethodError, TrainConfigError)


if __name__ == "__main__":
    sys.exit(main())

"""The ``memcast`` console command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from memcast import __version__

# the subcommands of the training stack (`pip install 'memcast[train]'`), which the API image lacks
TRAIN_COMMANDS = {
    "pretrain": "train a model offline and write a checkpoint directory",
    "evaluate": "online test: replay the test split through the online update",
    "make-data": "write memcast's generated multivariate data set (CSV)",
    "replay": "post a data set's test split to a running server and score its forecasts",
}


def build_parser() -> argparse.ArgumentParser:
    # Imported here so `memcast --version` stays fast and each package owns its subcommands.
    from service import cli as service_cli

    parser = argparse.ArgumentParser(prog="memcast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"memcast {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    try:
        from memcast import replay
        from trainer import cli as trainer_cli
    except ModuleNotFoundError as exc:  # an install without the training stack (the API image)
        _register_missing(sub, exc.name or "a training dependency")
    else:
        trainer_cli.register(sub)
        replay.register(sub)
    service_cli.register(sub)
    return parser


def _register_missing(sub: argparse._SubParsersAction, module: str) -> None:
    """Subcommands that say what to install instead of failing with a traceback."""
    for name, help_text in TRAIN_COMMANDS.items():
        command = sub.add_parser(name, help=f"{help_text} (needs memcast[train])", add_help=False)
        command.set_defaults(func=_missing(name, module), takes_any_flags=True)


def _missing(name: str, module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        sys.stderr.write(
            f"memcast {name}: error: this installation has no training stack ({module} is missing); "
            "install it with: pip install 'memcast[train]' (or use the memcast-train image)\n"
        )
        return 2

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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

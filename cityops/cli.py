"""The ``cityops`` command line: one entry point, one subcommand per service.

Each package registers its own subcommands through a ``register(subparsers)``
function, so this module stays a thin dispatcher. A subcommand handler takes
the parsed namespace and returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cityops.logs import configure_logging

# Packages that contribute subcommands, in the order their help is listed.
_COMMAND_MODULES = (
    "cityops.commands",
    "cityops.device_commands",
    "ingest.cli",
    "simulators.cli",
    "rules.cli",
    "control_api.cli",
)

Handler = Callable[[argparse.Namespace], int]
SubParsers = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser() -> argparse.ArgumentParser:
    """Build the full parser, asking each package for its subcommands."""
    parser = argparse.ArgumentParser(
        prog="cityops",
        description="Operations control center for a city: ingest, rules, console, simulators.",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="log format (default: text on a terminal, json otherwise)",
    )
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module: Any = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A package that has no commands yet is simply absent.
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cityops`` with ``argv`` (default: the process arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level, fmt=args.log_format)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        logging.getLogger("cityops").info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

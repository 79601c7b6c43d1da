"""The ``neox-ray`` command line: one subcommand per product surface, each defined next to its code.

``generate`` / ``score`` (Ray Data batch jobs) come from :mod:`neox_ray.batch.cli`, ``serve`` (the online
endpoint) from :mod:`neox_ray.serve.cli`, ``demo`` (the quick start) from here. Each module exposes
``add_parser(subparsers)`` which registers its subcommand with ``func=...`` set; this file only dispatches.

It also owns the top-level error handler (:func:`run_guarded`, used by ``jobs/*.py`` too): no traceback
reaches the user. A mistake in what the user gave (config, checkpoint, input, output) prints one line
``error: ...`` and exits 2; anything else prints one line naming the exception and exits 1; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from collections.abc import Callable

SUBCOMMAND_MODULES = ("neox_ray.batch.cli", "neox_ray.serve.cli", "neox_ray.demo_cli")

EXIT_USER_ERROR = 2      # the same code argparse uses for a bad command line
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for Ctrl-C

# Exceptions that mean "what you gave cannot work", by dotted name: looked up in sys.modules at error time,
# so the handler imports nothing (an exception of a class whose module was never imported cannot occur).
USER_ERRORS = (
    "neox_ray.batch.config.JobConfigError",
    "neox_ray.batch.runner.JobError",
    "neox_ray.batch.source.InputError",
    "neox_ray.batch.sink.OutputError",
    "neox_ray.config.ConfigError",
    "neox_ray.loader.CheckpointError",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neox-ray", description="GPT-NeoX inference on Ray: batch generation, "
                                     "perplexity scoring and an OpenAI-compatible endpoint.")
    add_debug_flag(parser)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a surface not built into this version
        module.add_parser(subparsers)
    for subparser in subparsers.choices.values():  # `neox-ray generate ... --debug` works as well
        add_debug_flag(subparser, default=argparse.SUPPRESS)
    return parser


def add_debug_flag(parser: argparse.ArgumentParser, default: object = False) -> None:
    with contextlib.suppress(argparse.ArgumentError):  # the command may define its own --debug
        parser.add_argument("--debug", action="store_true", default=default,
                            help="on an error, show the Python traceback instead of a one-line message")


def is_user_error(exc: BaseException) -> bool:
    for dotted in USER_ERRORS:
        module_name, _, class_name = dotted.rpartition(".")
        error_class = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(error_class, type) and isinstance(exc, error_class):
            return True
    return False


def run_guarded(command: Callable[[], int | None], debug: bool = False) -> int:
    """Runs ``command`` and turns any exception into one line on stderr and an exit code."""
    try:
        return int(command() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the exception holds
        if is_user_error(exc):
            print(f"error: {message}", file=sys.stderr)
            return EXIT_USER_ERROR
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"error: unexpected {type(exc).__name__}: {message}{hint}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

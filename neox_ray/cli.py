"""The ``neox-ray`` command line: one subcommand per product surface, each defined next to its code.

``generate`` / ``score`` (Ray Data batch jobs) come from :mod:`neox_ray.batch.cli`, ``serve`` (the online
endpoint) from :mod:`neox_ray.serve.cli`, ``demo`` (the quick start) from here. Each module exposes
``add_parser(subparsers)`` which registers its subcommand with ``func=...`` set; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("neox_ray.batch.cli", "neox_ray.serve.cli", "neox_ray.demo_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neox-ray", description="GPT-NeoX inference on Ray: batch generation, "
                                     "perplexity scoring and an OpenAI-compatible endpoint.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a surface not built into this version
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

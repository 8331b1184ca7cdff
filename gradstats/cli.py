"""The `gradstats` command (also `python -m gradstats`)."""

from __future__ import annotations

import argparse
import sys

from . import demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradstats",
        description="Per-channel gradient statistics of BatchNorm networks, from a fused batch-norm backward.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("demo", help="one training step of an instrumented ResNet, per-layer gradient table")
    demo.add_arguments(p)
    p.set_defaults(run=demo.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

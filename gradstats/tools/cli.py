"""The `gradstats` command (also `python -m gradstats`)."""

from __future__ import annotations

import argparse
import sys

from ..extras import MissingExtra
from . import analyze, compare_shapes, demo, report, train
from .bench import cli as bench


def _analyze(args: argparse.Namespace) -> int:
    """`analyze` compares network shapes when given --compare-shapes (or --seeds, which only that
    comparison takes), and analyses BN/skip variants otherwise."""
    if args.compare_shapes is not None or args.seeds is not None:
        return compare_shapes.main(args)
    return analyze.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradstats",
        description="Per-channel gradient statistics of BatchNorm networks, "
        "from a fused batch-norm backward.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, run, help in (
        ("demo", demo, demo.run, "one training step of an instrumented ResNet, per-layer gradient table"),
        (
            "bench",
            bench,
            bench.main,
            "time the fused op against PyTorch's backward (and --e2e, a training step)",
        ),
        (
            "analyze",
            analyze,
            _analyze,
            "gradient variance per residual block for BN/skip ablations (arXiv 1812.00342)",
        ),
        (
            "train",
            train,
            train.main,
            "train a ResNet, logging gradient statistics; checkpoints, resume, torchrun",
        ),
        ("report", report, report.main, "one self-contained HTML page from a training run's folder"),
    ):
        p = commands.add_parser(name, help=help)
        module.add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    # Bad options or data, or an optional package missing (MissingExtra names its pip extra):
    # say what, not a traceback.
    except (ValueError, OSError, MissingExtra) as error:
        parser.exit(2, f"gradstats {args.command}: error: {error}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

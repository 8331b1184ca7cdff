"""`gradstats bench`: the command line of the op benchmark (op.py) and of the training-step
benchmark (`--e2e`, step.py)."""

from __future__ import annotations

import argparse
import json
import time

from ...extras import require
from ..options import check_min, resolve_device
from .op import DTYPES, HEADER, PER_SAMPLE_HEADER, PRESETS, bench_shape, format_row
from .step import run_e2e
from .timing import (
    ALLOCATOR_LABELS,
    copy_bandwidth,
    geometric_mean,
    git_commit,
    machine_description,
    steady_allocator,
)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape expects N,C,H,W of positive integers, got {text!r}")
    return dims  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        action="append",
        choices=sorted(PRESETS),
        help="BN shapes of a network: resnet56-cifar (batch 128), resnet50 (batch 32 and 64); repeatable",
    )
    parser.add_argument(
        "--shape", action="append", type=_shape, metavar="N,C,H,W", help="a shape to time; repeatable"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last tensors (default: contiguous NCHW)"
    )
    parser.add_argument("--both-layouts", action="store_true", help="time NCHW and channels_last")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed rounds per configuration (median reported)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows and the summary as JSON")
    parser.add_argument(
        "--per-sample",
        action="store_true",
        help="also time the op with per_sample=True (columns per-sample ms, per-sample/fused)",
    )
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="instead: one training step of a CIFAR ResNet-56 (batch 128) plain, converted, "
        "instrumented, and with hooks",
    )
    parser.add_argument(
        "--steps", type=int, default=21, help="--e2e: timed rounds (one step of each variant per round)"
    )
    parser.add_argument(
        "--steady-allocator",
        action="store_true",
        help="CPU: keep freed memory in the process (glibc mallopt) instead of the default allocator "
        "a training process has; labelled in the output",
    )


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_min(args, ("repeats", "steps"), 1)
    # Off by default: a training process runs with the allocator's defaults (timing.py).
    steady = args.steady_allocator and device.type == "cpu" and steady_allocator()
    if args.e2e:
        return run_e2e(device, args.steps, args.json, steady_allocator=steady)

    shapes = [s for name in (args.preset or []) for s in PRESETS[name]] + list(args.shape or [])
    if not shapes:
        shapes = PRESETS["resnet56-cifar"]
    layouts = [False, True] if args.both_layouts else [args.channels_last]
    dtype = DTYPES[args.dtype]
    copy = copy_bandwidth(device)
    machine = machine_description(device)
    print(f"{machine}; copy bandwidth {copy:.1f} GB/s")
    print(f"allocator: {ALLOCATOR_LABELS[steady]}")
    print(HEADER + (PER_SAMPLE_HEADER if args.per_sample else ""))
    configs = [(s, cl) for s in shapes for cl in layouts]
    rows = []
    progress = None
    if len(configs) > 4:
        tqdm = require("tqdm", "gradstats bench's progress bar").tqdm
        # disable=None: no bar when the output is not a terminal (logs stay clean)
        progress = tqdm(total=len(configs), desc="bench", leave=False, unit="config", disable=None)
    for shape, channels_last in configs:
        row = bench_shape(
            shape, dtype, channels_last, device, args.repeats, copy_gbps=copy, per_sample=args.per_sample
        )
        rows.append(row)
        line = format_row(row)
        if progress is not None:
            progress.write(line)
            progress.update()
        else:
            print(line)
    if progress is not None:
        progress.close()
    summary = {
        "fused_vs_native_geomean": geometric_mean([r.fused_vs_native for r in rows]),
        "unfused_vs_fused_geomean": geometric_mean([r.unfused_vs_fused for r in rows]),
        "fused_pct_copy_geomean": geometric_mean([r.fused_pct_copy for r in rows]),
    }
    if args.per_sample:
        summary["per_sample_vs_fused_geomean"] = geometric_mean([r.per_sample_vs_fused for r in rows])
    print(
        f"geometric mean over {len(rows)} configurations: "
        f"fused/native {summary['fused_vs_native_geomean']:.3f}, "
        f"unfused/fused {summary['unfused_vs_fused_geomean']:.2f}, "
        f"fused at {summary['fused_pct_copy_geomean']:.0f}% of copy bandwidth"
    )
    if args.per_sample:
        print(f"per-sample/fused {summary['per_sample_vs_fused_geomean']:.3f} (geometric mean)")
    if args.json:
        payload = {
            "machine": machine,
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d"),
            "allocator": "steady" if steady else "default",
            "copy_gbps": copy,
            "repeats": args.repeats,
            "rows": [r.as_dict() for r in rows],
            "summary": summary,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    return 0

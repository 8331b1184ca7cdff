"""`gradstats bench --e2e`: what gradient statistics cost in a whole training step.

One SGD step (forward, backward, optimizer) of a CIFAR ResNet-56 at batch 128 on random data, in
the variants of VARIANTS, all built from the same weights (adding a variant is one entry there):
  plain      nn.BatchNorm2d, no statistics
  convert    gradstats.convert_batchnorm(): every BN records its dy and dx statistics
  gradstats  gradstats.instrument(): every BN converted, a probe on every residual block
  per-sample convert, with per_sample=True: also the per-sample terms of the BN parameter
             gradients and their statistics over samples (compared with convert as well)
  hooks      plain BN with tensor hooks computing torch.var_mean of dy and dx at every BN layer
             (what users do today; results kept on the device, no host synchronisation)
The variants run round by round in rotating order, so each round times every variant next to
the others. Reported per variant: the median step time and its interquartile range, the minor
page faults per step (getrusage around each step: memory the process got back from the OS and
touched again), and for each variant but plain its overhead, the median of the per-round ratios
to plain with their interquartile range and their range.

The process runs with the allocator as a training process has it (see timing.py); with
steady_allocator=True, glibc keeps freed memory instead, and the output says so.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...convert import convert_batchnorm, instrument
from ...models import cifar_resnet
from .timing import ALLOCATOR_LABELS, git_commit, machine_description, quartiles, time_rounds

DEPTH, BATCH = 56, 128
BASELINE = "plain"


def _add_var_mean_hooks(model: nn.Module) -> list:
    """Per BN layer, torch.var_mean over (N, H, W) of the gradient at its output (dy) and at its
    input (dx), through tensor hooks (module backward hooks refuse the in-place ReLUs after BN)."""
    results: list = []

    def record(grad):
        results.append(torch.var_mean(grad, dim=(0, 2, 3), correction=0))

    def forward_hook(module, inputs, output):
        if torch.is_grad_enabled():
            if inputs[0].requires_grad:
                inputs[0].register_hook(record)
            output.register_hook(record)

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(forward_hook)
    return results


@dataclass(frozen=True)
class Variant:
    name: str
    # Changes the model in place; returns a list the step clears (results kept per step) or None.
    setup: Callable[[nn.Module], list | None]


def _convert(model: nn.Module) -> None:
    convert_batchnorm(model)


def _instrument(model: nn.Module) -> None:
    instrument(model)


def _convert_per_sample(model: nn.Module) -> None:
    convert_batchnorm(model, per_sample=True)


VARIANTS = [
    Variant(BASELINE, lambda model: None),
    Variant("convert", _convert),
    Variant("per-sample", _convert_per_sample),
    Variant("gradstats", _instrument),
    Variant("hooks", _add_var_mean_hooks),
]


def _variants(device: torch.device, variants: list[Variant] = VARIANTS):
    """name -> (model, optimizer, per-step results or None), every model with the same weights."""
    torch.manual_seed(0)
    state = cifar_resnet(DEPTH).state_dict()
    models = {}
    for variant in variants:
        model = cifar_resnet(DEPTH)
        model.load_state_dict(state)
        results = variant.setup(model)
        model.to(device).train()
        models[variant.name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), results)
    return models


# A variant that adds one feature to another is also compared with that one (the feature's cost).
COMPARED_WITH = {"per-sample": "convert"}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(names: list[str], times: list[list[float]], faults: list[list[int]]) -> dict:
    """Per variant: median and IQR of its step times, median minor faults per step, and (but for
    the baseline) the median, IQR and range of its per-round overhead over the baseline."""
    base = times[names.index(BASELINE)]
    results = {}
    for name, t, f in zip(names, times, faults):
        q1, q3 = quartiles(t)
        r = {
            "step_ms": statistics.median(t),
            "iqr_ms": q3 - q1,
            "steps_ms": t,
            "minor_faults_per_step": statistics.median(f),
            "minor_faults": f,
        }
        if name != BASELINE:
            r.update(_overhead(t, base))
        other = COMPARED_WITH.get(name)
        if other in names:
            r["compared_with"] = {"variant": other, **_overhead(t, times[names.index(other)])}
        results[name] = r
    return results


def _overhead(times: list[float], reference: list[float]) -> dict:
    """Median, IQR and range of the per-round overhead (%) of ``times`` over ``reference``."""
    overheads = [100 * (a / b - 1) for a, b in zip(times, reference)]
    return {
        "overhead_pct": statistics.median(overheads),
        "overhead_iqr_pct": list(quartiles(overheads)),
        "overhead_range_pct": [min(overheads), max(overheads)],
    }


def format_results(results: dict) -> list[str]:
    header = f"  {'variant':<10} {'median ms':>10} {'iqr ms':>8} {'faults/step':>12}"
    lines = [header + "   overhead: median [IQR] (range)"]
    for name, r in results.items():
        line = f"  {name:<10} {r['step_ms']:10.1f} {r['iqr_ms']:8.1f} {r['minor_faults_per_step']:12.0f}"
        if "overhead_pct" in r:
            line += "   " + _format_overhead(r)
        lines.append(line)
        if "compared_with" in r:
            compared = r["compared_with"]
            indent = " " * len(header)
            lines.append(f"{indent}   vs {compared['variant']}: {_format_overhead(compared)}")
    return lines


def _format_overhead(r: dict) -> str:
    (q1, q3), (lo, hi) = r["overhead_iqr_pct"], r["overhead_range_pct"]
    return f"{r['overhead_pct']:+.1f}% [{q1:+.1f}%, {q3:+.1f}%] ({lo:+.1f}% .. {hi:+.1f}%)"


def run_e2e(
    device: torch.device, steps: int, json_path: str | None = None, steady_allocator: bool = False
) -> int:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(device)
    models = _variants(device)
    names = list(models)
    faults: list[list[int]] = [[] for _ in names]

    def step_fn(i):
        model, optimizer, results = models[names[i]]

        def step():
            before = _minor_faults()
            if results is not None:
                results.clear()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            faults[i].append(_minor_faults() - before)

        return step

    machine = machine_description(device)
    allocator = ALLOCATOR_LABELS[steady_allocator]
    print(machine)
    print(f"allocator: {allocator}")
    print(
        f"one training step of a CIFAR ResNet-{DEPTH}, batch {BATCH}: {steps} rounds, variants in "
        f"rotating order; overhead = per-round step time / {BASELINE}'s - 1"
    )
    start = time.perf_counter()
    warmup = 2
    times = time_rounds([step_fn(i) for i in range(len(names))], steps, device, warmup=warmup)
    faults = [f[warmup:] for f in faults]  # the timed rounds only
    results = summarize(names, times, faults)
    for line in format_results(results):
        print(line)
    print(f"({time.perf_counter() - start:.0f} s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "commit": git_commit(),
                    "date": time.strftime("%Y-%m-%d"),
                    "allocator": "steady" if steady_allocator else "default",
                    "depth": DEPTH,
                    "batch": BATCH,
                    "steps": steps,
                    "baseline": BASELINE,
                    "results": results,
                },
                f,
                indent=1,
            )
        print(f"wrote {json_path}")
    return 0

"""`gradstats bench --e2e`: what gradient statistics cost in a whole training step.

One SGD step (forward, backward, optimizer) of a CIFAR ResNet-56 at batch 128 on random data, in
three variants built from the same weights:
  plain      nn.BatchNorm2d, no statistics
  gradstats  gradstats.instrument(): every BN converted, a probe on every residual block
  hooks      plain BN with tensor hooks computing torch.var_mean of dy and dx at every BN layer
             (what users do today; results kept on the device, no host synchronisation)
The variants run round by round in rotating order; medians over the rounds are reported, and the
overheads of gradstats and hooks relative to plain.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from ...convert import instrument
from ...models import cifar_resnet
from .timing import git_commit, machine_description, time_interleaved

DEPTH, BATCH = 56, 128


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


def _variants(device: torch.device):
    torch.manual_seed(0)
    base = cifar_resnet(DEPTH)
    state = base.state_dict()
    models = {}
    for name in ("plain", "gradstats", "hooks"):
        model = cifar_resnet(DEPTH)
        model.load_state_dict(state)
        if name == "gradstats":
            instrument(model)
        model.to(device).train()
        hooks = _add_var_mean_hooks(model) if name == "hooks" else None
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), hooks)
    return models


def run_e2e(device: torch.device, steps: int, json_path: str | None = None) -> int:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(device)
    models = _variants(device)

    def step_fn(name):
        model, optimizer, hooks = models[name]

        def step():
            if hooks is not None:
                hooks.clear()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        return step

    names = list(models)
    machine = machine_description(device)
    print(machine)
    print(f"one training step of a CIFAR ResNet-{DEPTH}, batch {BATCH}, median of {steps} steps per variant")
    start = time.perf_counter()
    timings = time_interleaved([step_fn(n) for n in names], steps, device, warmup=2)
    results = {n: {"step_ms": t, "iqr_ms": iqr} for n, (t, iqr) in zip(names, timings)}
    plain = results["plain"]["step_ms"]
    for n in names:
        r = results[n]
        r["overhead_pct"] = 100 * (r["step_ms"] / plain - 1)
        overhead = "" if n == "plain" else f"overhead {r['overhead_pct']:+.1f}%"
        print(f"  {n:<10} {r['step_ms']:9.1f} ms (iqr {r['iqr_ms']:.1f})   {overhead}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "commit": git_commit(),
                    "date": time.strftime("%Y-%m-%d"),
                    "depth": DEPTH,
                    "batch": BATCH,
                    "steps": steps,
                    "results": results,
                },
                f,
                indent=1,
            )
        print(f"wrote {json_path}")
    return 0

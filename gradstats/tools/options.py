"""Option checks shared by the commands: one style of error, naming the option, the bound and
the value given (raised as ValueError; the CLI prints it without a traceback)."""

from __future__ import annotations

import torch


def check_min(options, names, minimum: int) -> None:
    """ValueError naming the option if any of ``names`` (attributes of ``options``) is below
    ``minimum``."""
    for name in names:
        value = getattr(options, name)
        if not value >= minimum:  # NaN too
            bound = ">= 0" if minimum == 0 else f"at least {minimum}"
            raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def check_choice(options, name: str, choices) -> None:
    """ValueError naming the option if attribute ``name`` of ``options`` (a value, or a list or
    tuple of values) is not among ``choices``."""
    value = getattr(options, name)
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if item not in choices:
            raise ValueError(
                f"--{name.replace('_', '-')} {item!r}: choose from {', '.join(map(str, choices))}"
            )


def check_range(options, name: str, low: float, high: float) -> None:
    """ValueError naming the option if attribute ``name`` of ``options`` (a number, or a list or
    tuple of numbers) is not strictly between ``low`` and ``high``."""
    value = getattr(options, name)
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if not low < item < high:  # NaN too
            raise ValueError(f"--{name.replace('_', '-')} must be in ({low}, {high}), got {value}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' is CUDA when available, else CPU; a bare 'cuda' becomes this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: not a device ({error})") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: gradstats runs on cpu or cuda[:index]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device

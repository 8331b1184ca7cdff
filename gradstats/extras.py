"""Optional dependencies: the library needs torch and numpy only; the tools and integrations
import the others lazily through ``require``, which names the pip extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

# pip extra of each optional top-level module (pyproject.toml [project.optional-dependencies]).
EXTRAS = {
    "matplotlib": "plot",
    "sklearn": "data",
    "PIL": "data",
    "tqdm": "tools",
    "tensorboard": "tensorboard",
    "torch.utils.tensorboard": "tensorboard",
    "lightning": "lightning",
    "wandb": "wandb",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed (or does not import); the message names the extra."""


def require(module: str, what: str) -> ModuleType:
    """``module`` imported, or MissingExtra saying that ``what`` needs it and which
    ``pip install gradstats[EXTRA]`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra = EXTRAS.get(module, EXTRAS.get(module.split(".")[0], module))
        raise MissingExtra(
            f"{what} needs {module.split('.')[0]}, which is not installed here "
            f"({type(error).__name__}: {error}); install it with: pip install 'gradstats[{extra}]'"
        ) from error

"""Reading pickles from untrusted files without running their code.

``pickle.load`` calls whatever callable a pickle names (``os.system``, ``subprocess.Popen``,
``pathlib.Path.write_text``...) while it reads the file, so a shared dataset folder could run a
command on the machine of whoever opens it. ``load_restricted_pickle`` reads the same format but
resolves only the few globals that plain data needs: numpy's array reconstruction, ``numpy.dtype``
(non-object dtypes only) and the ``_codecs.encode(text, "latin1")`` call Python 3 writes for bytes
in protocol 2. The builtin containers, numbers, strings and bytes need no global at all. Any
other global is refused, before anything is called, with an UnsafePickleError naming the file and
the global.

Rule for this package: every pickle gradstats reads goes through ``load_restricted_pickle``.
Never hand a folder of pickles to a reader that calls ``pickle.load`` itself (torchvision's CIFAR10
and CIFAR100 do) unless that reader is given this loader; ``tests/test_security.py`` fails on a
bare ``pickle.load``/``pickle.loads`` or torchvision CIFAR reader in gradstats/.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

try:  # numpy >= 2 keeps the implementation in numpy._core; pickles written by 1.x name numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed set (it may try to run code)."""


def _data_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for plain data: an object dtype would let an array hold arbitrary objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"object dtype {dtype} refused: an array of Python objects is not plain data")
    return dtype


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What ``_codecs.encode`` is called for in a protocol-2 pickle of bytes; no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} refused (only latin1 bytes)")
    return text.encode("latin1")


# (module, name) as a pickle spells them -> what they resolve to. Nothing is imported by name.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,  # Python 2 / numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,  # numpy 2
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,  # protocol 5, numpy 1.x
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,  # protocol 5, numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _data_dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals in ``_ALLOWED`` (see the module
    docstring); ``persistent_load`` is refused by the base class."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load global {module}.{name}: only numpy arrays, builtin containers, "
                f"numbers, strings and bytes are read (a pickle naming other globals can run code)"
            ) from None


def load_restricted_pickle(path: str, *, encoding: str = "bytes") -> Any:
    """The object pickled in the file at ``path``, read with RestrictedUnpickler.
    ``encoding="bytes"`` reads Python 2 strings (as in the CIFAR batches) as bytes. Raises
    UnsafePickleError (naming ``path``) for a forbidden global, pickle.UnpicklingError for a
    malformed file, OSError for an unreadable one."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding=encoding).load()
        except UnsafePickleError as error:
            raise UnsafePickleError(f"{path}: {error}") from None

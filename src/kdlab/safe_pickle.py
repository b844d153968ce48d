"""A restricted unpickler: plain containers and NumPy arrays only, never arbitrary code.

Official CIFAR archives and other toolkits' files are pickles. ``pickle.load`` on an untrusted file can run any code
(via ``__reduce__``); :func:`safe_load` refuses every global except the handful needed to rebuild NumPy arrays.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import numpy as np

from kdlab.errors import DataError


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # NumPy ≥ 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    import codecs

    allowed = {
        ("_reconstruct", multiarray._reconstruct),
        ("scalar", multiarray.scalar),
    }
    table: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for name, obj in allowed:
            table[(mod, name)] = obj
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    # Python 3 pickles of ``bytes`` at protocol ≤ 2 go through codecs.encode(str, 'latin1'); harmless.
    table[("_codecs", "encode")] = codecs.encode
    return table


_ALLOWED = _numpy_globals()


class UnsafePickleError(DataError):
    """A pickle asked for something other than plain data."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed NumPy globals."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused to unpickle '{module}.{name}': only plain data and NumPy arrays are allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused to unpickle a persistent reference: only plain data is allowed")


def safe_load(f: IO[bytes] | bytes, encoding: str = "bytes") -> Any:
    """Load a pickle that may only contain plain containers, strings, numbers and NumPy arrays."""
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(f)
    try:
        return RestrictedUnpickler(f, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except Exception as err:
        raise DataError(f"not a readable pickle: {type(err).__name__}: {err}") from None

"""Keep pyarrow from importing pandas in the local engine's processes.

pyarrow imports pandas lazily, the first time it converts anything (building an
array, ``ChunkedArray.to_numpy``), only to recognise pandas objects among its inputs.
The local engine has none, yet that import cost ~0.4 s of CPU on the serial part of a
run (the index build, before the workers are forked). :func:`skip_pandas_probe`
answers pyarrow's two probes (the Python-level shim and the C++ conversion's static
data) with "no pandas" by failing ``import pandas`` only while it probes; pandas stays
importable afterwards, and ``to_pandas`` still imports it on demand.

What changes in the process: pyarrow no longer recognises pandas' ``NA``/``NaT``
singletons inside Python sequences or object arrays (``from_pandas=True``). Nothing in
the local engine builds arrays from pandas objects; only the console script calls this
(``main_score_batch(own_process=True)``, local engine): never a process it shares.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.lib  # type: ignore[import-untyped, unused-ignore]

__all__ = ["skip_pandas_probe"]


class _RefusePandas(importlib.abc.MetaPathFinder):
    """``import pandas`` (and its submodules) fails while this finder is installed."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ImportError(f"{fullname}: not imported by score-batch's local engine")
        return None


def skip_pandas_probe() -> bool:
    """Make pyarrow treat pandas as absent in this process (and processes forked from
    it); ``False`` (nothing done) when pandas is already imported or this pyarrow has
    no ``_pandas_api`` shim (a private name: a pyarrow without it runs as before)."""
    shim = getattr(pyarrow.lib, "_pandas_api", None)  # private: absent in another pyarrow
    if "pandas" in sys.modules or shim is None:
        return False
    finder = _RefusePandas()
    sys.meta_path.insert(0, finder)
    try:
        _ = shim.have_pandas  # the shim's probe: remembered
        pa.array([0.0])  # the C++ conversion's probe: remembered
    finally:
        sys.meta_path.remove(finder)
    return True

"""``skip_pandas_probe``: pyarrow converts without importing pandas; pandas still loads
on demand. Each case runs in a fresh interpreter (this one may have pandas already)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.strip()


def test_arrays_are_built_and_read_without_importing_pandas() -> None:
    out = _python(
        """
        import sys
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        from server.batch_scoring.no_pandas import skip_pandas_probe
        assert skip_pandas_probe()
        column = pa.chunked_array([pa.array(np.arange(3.0)), pa.array([None, 1.0])])
        assert pc.is_valid(column).to_numpy(zero_copy_only=False).tolist() == [
            True, True, True, False, True
        ]
        assert pa.array(["a", None]).to_numpy(zero_copy_only=False).tolist() == ["a", None]
        print("pandas" in sys.modules)
        """
    )
    assert out == "False"


def test_without_the_probe_pyarrow_imports_pandas() -> None:
    """What the probe saves: the same conversion imports pandas otherwise."""
    out = _python(
        """
        import sys
        import pyarrow as pa
        pa.chunked_array([pa.array([1.0, None])]).to_numpy()
        print("pandas" in sys.modules)
        """
    )
    assert out == "True"


def test_pandas_still_loads_on_demand() -> None:
    out = _python(
        """
        import pyarrow as pa
        from server.batch_scoring.no_pandas import skip_pandas_probe
        skip_pandas_probe()
        frame = pa.table({"x": [1.5, 2.5]}).to_pandas()
        import pandas
        print(type(frame) is pandas.DataFrame, frame["x"].tolist())
        """
    )
    assert out == "True [1.5, 2.5]"


def test_nothing_is_done_once_pandas_is_imported() -> None:
    out = _python(
        """
        import pandas
        from server.batch_scoring.no_pandas import skip_pandas_probe
        print(skip_pandas_probe())
        """
    )
    assert out == "False"


def test_a_pyarrow_without_the_private_shim_runs_as_before() -> None:
    """``_pandas_api`` is pyarrow's private name: without it the probe does nothing
    (returns False) instead of failing the run."""
    out = _python(
        """
        import pyarrow.lib
        del pyarrow.lib._pandas_api
        from server.batch_scoring.no_pandas import skip_pandas_probe
        print(skip_pandas_probe())
        """
    )
    assert out == "False"

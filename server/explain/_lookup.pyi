import numpy as np
import numpy.typing as npt

class Kernel:
    """Subset tables in path order, copied and checked (see _lookup.c)."""

    def __init__(
        self,
        features: int,
        path_start: npt.NDArray[np.int32],
        feature: npt.NDArray[np.int32],
        lo: npt.NDArray[np.float32],
        hi: npt.NDArray[np.float32],
        nan_ok: npt.NDArray[np.uint8],
        scale: npt.NDArray[np.float64],
        offset: npt.NDArray[np.int64],
        table: npt.NDArray[np.float64],
    ) -> None: ...
    @property
    def cells(self) -> int: ...
    def add_to(self, x: npt.NDArray[np.float32], out: npt.NDArray[np.float64]) -> None: ...

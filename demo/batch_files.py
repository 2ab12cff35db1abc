"""Write the demo population's batch groups to files the batch loader reads.

The embedded stack writes ``customer_profile`` and ``card_profile`` files with
:func:`write_demo_batch_files`, then loads each with
:func:`feature_streams.batch_load.load_group_file`. The population is
``make_population(numpy.random.default_rng(seed), n_customers=..., n_merchants=...)``:
a traffic generator built with the same three arguments draws ids that exist in
these files, with the same values :meth:`DemoPopulation.customer_features` gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.csv as pacsv  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from demo.synthetic import (
    CARD_BATCH_FEATURES,
    CUSTOMER_BATCH_FEATURES,
    DemoPopulation,
    make_population,
)

__all__ = [
    "DEFAULT_DEMO_CUSTOMERS",
    "DEFAULT_DEMO_SEED",
    "DemoBatchFiles",
    "write_demo_batch_files",
    "write_population_batch_files",
]

DEFAULT_DEMO_SEED: Final = 7
DEFAULT_DEMO_CUSTOMERS: Final = 100_000
"""About 130,000 cards (30 % of customers hold two)."""
DEFAULT_DEMO_MERCHANTS: Final = 1_500

FileFormat = Literal["parquet", "csv"]


@dataclass(frozen=True)
class DemoBatchFiles:
    """The files written, by batch group name, and the population's size."""

    paths: dict[str, Path]
    n_customers: int
    n_cards: int


def _table(entity: str, ids: tuple[str, ...], names: tuple[str, ...], values: object) -> pa.Table:
    matrix = np.asarray(values, dtype=np.float64)
    columns = [pa.array(ids, type=pa.string())]
    columns += [pa.array(matrix[:, i]) for i in range(len(names))]
    return pa.Table.from_arrays(columns, names=[entity, *names])


def write_population_batch_files(
    population: DemoPopulation, out_dir: Path, *, file_format: FileFormat = "parquet"
) -> DemoBatchFiles:
    """Write ``customer_profile`` and ``card_profile`` of ``population`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "customer_profile": _table(
            "customer_id",
            population.customer_ids,
            CUSTOMER_BATCH_FEATURES,
            population.customer_batch,
        ),
        "card_profile": _table(
            "card_id", population.card_ids, CARD_BATCH_FEATURES, population.card_batch
        ),
    }
    paths: dict[str, Path] = {}
    for group, table in tables.items():
        path = out_dir / f"{group}.{file_format}"
        tmp = path.with_name(f".{path.name}.tmp")
        if file_format == "parquet":
            pq.write_table(table, tmp)
        else:
            pacsv.write_csv(table, tmp)
        tmp.replace(path)  # a reader never sees a half-written file
        paths[group] = path
    return DemoBatchFiles(paths, len(population.customer_ids), len(population.card_ids))


def write_demo_batch_files(
    out_dir: Path,
    *,
    seed: int = DEFAULT_DEMO_SEED,
    n_customers: int = DEFAULT_DEMO_CUSTOMERS,
    n_merchants: int = DEFAULT_DEMO_MERCHANTS,
    file_format: FileFormat = "parquet",
) -> DemoBatchFiles:
    """Draw the demo population from ``seed`` and write its batch groups (reproducible)."""
    population = make_population(
        np.random.default_rng(seed), n_customers=n_customers, n_merchants=n_merchants
    )
    return write_population_batch_files(population, out_dir, file_format=file_format)

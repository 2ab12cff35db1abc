"""Demo data and the demo fraud models: development tree only, never in the image.

``demo.synthetic`` draws reproducible labelled transactions whose columns are
:data:`DEMO_FEATURES`; ``demo.batch_files`` writes the demo population's batch
groups to files the batch loader reads; ``demo.train`` trains the ``fraud``
versions and writes them, with manifests, to a model repository (imported
separately because it needs the ``train`` extra); ``demo.command`` is the
``streamscore models demo`` plugin command. Used by ``devstack``, ``bench`` and the
tests; ``server`` and ``feature_streams`` never import it.
"""

from __future__ import annotations

from demo.synthetic import (
    CARD_BATCH_FEATURES,
    CARD_STREAM_FEATURES,
    CUSTOMER_BATCH_FEATURES,
    DEMO_FEATURES,
    MERCHANT_STREAM_FEATURES,
    REQUEST_FEATURES,
    DemoPopulation,
    SyntheticTransaction,
    generate_dataset,
    make_population,
    sample_transaction,
    sample_transactions,
)

__all__ = [
    "CARD_BATCH_FEATURES",
    "CARD_STREAM_FEATURES",
    "CUSTOMER_BATCH_FEATURES",
    "DEMO_FEATURES",
    "MERCHANT_STREAM_FEATURES",
    "REQUEST_FEATURES",
    "DemoPopulation",
    "SyntheticTransaction",
    "generate_dataset",
    "make_population",
    "sample_transaction",
    "sample_transactions",
]

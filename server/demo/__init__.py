"""Demo fraud models: synthetic transactions and the training/export pipeline.

``server.demo.synthetic`` draws reproducible labelled transactions whose columns
are :data:`DEMO_FEATURES`; ``server.demo.train`` trains the ``fraud`` versions and
writes them, with manifests, to a model repository (imported separately because
it needs the ``train`` extra).
"""

from __future__ import annotations

from server.demo.synthetic import (
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

"""Reproducible synthetic card transactions with a learnable fraud signal.

Everything is drawn from a ``numpy.random.Generator`` passed in (or built from a
seed), so the same seed gives the same rows. A :class:`DemoPopulation` holds the
entities (customers, cards, merchants) and their batch features; transactions are
drawn against it. :func:`sample_transaction` draws one transaction's request-time
part plus entity ids (what a live event producer sends); :func:`generate_dataset`
draws a labelled training matrix whose columns are :data:`DEMO_FEATURES`.

Stream features describe the card's *earlier* events (the current transaction is
not counted). A card with no earlier event in 24 h reports zero counts, sums, max
and mean; ``card_seconds_since_last_txn`` is capped at
:data:`SECONDS_SINCE_LAST_CAP` (also the value for a card with no history at all,
whose ``card_last_amount`` is 0).

Fraud comes in three patterns: bursts of small card-testing charges, account
takeover (large amounts, night hours, international, card not present, risky
merchant categories) and "stealth" fraud that looks almost legitimate, so a
model reaches a high AUC but not 1.0. Entity risk (bureau score, new card,
chargebacks, home-country risk) raises the fraud rate; overall ~2 % positives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

REQUEST_FEATURES: Final[tuple[str, ...]] = (
    "amount",
    "mcc",
    "channel",
    "hour_of_day",
    "day_of_week",
    "is_international",
    "card_present",
    "distance_from_home_km",
)
"""Sent with the scoring request."""

CUSTOMER_BATCH_FEATURES: Final[tuple[str, ...]] = (
    "customer_age_years",
    "account_tenure_days",
    "credit_limit",
    "avg_amount_90d",
    "std_amount_90d",
    "txn_count_90d",
    "chargebacks_365d",
    "bureau_risk_score",
    "home_country_risk",
)
"""Batch features keyed by ``customer_id``."""

CARD_BATCH_FEATURES: Final[tuple[str, ...]] = ("card_age_days", "preapproved_limit")
"""Batch features keyed by ``card_id``."""

CARD_STREAM_FEATURES: Final[tuple[str, ...]] = (
    "card_txn_count_5m",
    "card_txn_count_1h",
    "card_txn_count_24h",
    "card_amount_sum_1h",
    "card_amount_sum_24h",
    "card_amount_max_24h",
    "card_amount_mean_24h",
    "card_seconds_since_last_txn",
    "card_last_amount",
    "card_intl_count_24h",
)
"""Stream-window features keyed by ``card_id`` (earlier events only)."""

MERCHANT_STREAM_FEATURES: Final[tuple[str, ...]] = ("merchant_txn_count_1h",)
"""Stream-window features keyed by ``merchant_id``."""

DEMO_FEATURES: Final[tuple[str, ...]] = (
    REQUEST_FEATURES
    + CUSTOMER_BATCH_FEATURES
    + CARD_BATCH_FEATURES
    + CARD_STREAM_FEATURES
    + MERCHANT_STREAM_FEATURES
)
"""The demo model's 30 input columns, in order."""

CHANNEL_POS: Final = 0
CHANNEL_ECOMMERCE: Final = 1
CHANNEL_ATM: Final = 2
CHANNELS: Final[tuple[str, ...]] = ("pos", "ecommerce", "atm")
"""Channel names by code."""

SECONDS_SINCE_LAST_CAP: Final = 7 * 24 * 3600.0
"""``card_seconds_since_last_txn`` ceiling (7 days); also the no-history value."""

FRAUD_PATTERNS: Final[tuple[str, ...]] = ("legit", "burst", "takeover", "stealth")
"""Pattern names by code; ``legit`` is the only non-fraud one."""

_LEGIT, _BURST, _TAKEOVER, _STEALTH = 0, 1, 2, 3
_DAY = 86_400.0
_HOUR = 3_600.0
_FIVE_MIN = 300.0

# mcc, kind, share of legit traffic, fraud attractiveness, amount factor.
_MCC_TABLE: Final[tuple[tuple[int, str, float, float, float], ...]] = (
    (5411, "pos", 20.0, 0.3, 1.0),  # grocery
    (5812, "pos", 15.0, 0.3, 0.7),  # restaurants
    (5541, "pos", 10.0, 1.0, 0.8),  # fuel
    (5311, "pos", 6.0, 0.8, 1.3),  # department stores
    (5912, "pos", 5.0, 0.3, 0.6),  # drug stores
    (5944, "pos", 1.0, 3.0, 4.0),  # jewelry
    (5732, "mixed", 4.0, 4.0, 3.0),  # electronics
    (4121, "ecommerce", 5.0, 0.5, 0.6),  # taxis / ride hailing
    (5999, "ecommerce", 8.0, 1.5, 1.0),  # misc retail
    (5816, "ecommerce", 5.0, 4.0, 0.5),  # digital goods
    (4829, "ecommerce", 1.0, 4.0, 2.5),  # money transfer
    (7995, "ecommerce", 1.0, 3.0, 1.5),  # gambling
    (6011, "atm", 4.0, 1.5, 2.0),  # cash withdrawal
)

# Relative share of legit transactions by hour of day.
_DIURNAL: Final = np.array(
    [
        *(1, 0.6, 0.4, 0.3, 0.3, 0.5, 1.2, 2.5, 4, 4.5, 5, 5.5),
        *(6.5, 6, 5.5, 5.5, 6, 6.5, 6.5, 6, 5, 4, 3, 2),
    ],
    dtype=np.float64,
)
_DIURNAL_P: Final = _DIURNAL / _DIURNAL.sum()
_NIGHT_P: Final = np.r_[np.ones(6), np.zeros(18)] / 6.0
_WEEKDAY_P: Final = np.array([1.0, 1.0, 1.0, 1.0, 1.1, 1.3, 1.2]) / 7.6


@dataclass(frozen=True)
class DemoPopulation:
    """Customers, cards and merchants with their batch features (read-only)."""

    customer_ids: tuple[str, ...]
    card_ids: tuple[str, ...]
    merchant_ids: tuple[str, ...]
    customer_batch: FloatArray
    """[n_customers, len(CUSTOMER_BATCH_FEATURES)]"""
    card_batch: FloatArray
    """[n_cards, len(CARD_BATCH_FEATURES)]"""
    card_customer: IntArray
    """Owning customer index of each card."""
    card_fraud_p: FloatArray
    """Probability that a transaction on the card is fraudulent."""
    card_activity: FloatArray
    """Sampling weight of each card (sums to 1)."""
    customer_travel: FloatArray
    """Share of a customer's legit transactions that are international."""
    merchant_mcc: IntArray
    merchant_channel: IntArray
    merchant_amount_factor: FloatArray
    merchant_rate_per_hour: FloatArray
    merchant_legit_p: FloatArray
    merchant_fraud_p: FloatArray

    def customer_features(self, customer_id: str) -> dict[str, float]:
        """Batch features of one customer, by name."""
        row = self.customer_batch[_index_of(self.customer_ids, "cust-", customer_id)]
        return dict(zip(CUSTOMER_BATCH_FEATURES, row.tolist(), strict=True))

    def card_features(self, card_id: str) -> dict[str, float]:
        """Batch features of one card, by name."""
        row = self.card_batch[_index_of(self.card_ids, "card-", card_id)]
        return dict(zip(CARD_BATCH_FEATURES, row.tolist(), strict=True))


@dataclass(frozen=True)
class SyntheticTransaction:
    """One transaction's request-time features plus the entity ids it concerns."""

    customer_id: str
    card_id: str
    merchant_id: str
    is_fraud: bool
    pattern: str
    """One of :data:`FRAUD_PATTERNS`; a producer may emit bursts for ``burst``."""
    request: dict[str, float]
    """Values of :data:`REQUEST_FEATURES`, in that order."""


@dataclass(frozen=True)
class _Requests:
    card: IntArray
    customer: IntArray
    merchant: IntArray
    pattern: IntArray
    values: FloatArray  # [n, len(REQUEST_FEATURES)]


def _index_of(ids: tuple[str, ...], prefix: str, key: str) -> int:
    suffix = key.removeprefix(prefix)
    if suffix == key or not suffix.isdigit():
        raise KeyError(key)
    index = int(suffix)
    if index >= len(ids) or ids[index] != key:
        raise KeyError(key)
    return index


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def make_population(
    rng: np.random.Generator, *, n_customers: int = 5_000, n_merchants: int = 1_500
) -> DemoPopulation:
    """Draw customers (1-2 cards each) and merchants with their batch features."""
    if n_customers < 1 or n_merchants < 1:
        raise ValueError("n_customers and n_merchants must be >= 1")
    age = np.clip(np.round(rng.normal(42.0, 14.0, n_customers)), 18, 95)
    tenure = np.minimum(
        np.round(rng.exponential(1_500.0, n_customers)) + 1, (age - 17) * 365
    ).astype(np.float64)
    credit_limit = np.clip(
        np.round(rng.lognormal(np.log(5_000), 0.6, n_customers), -2), 500, 50_000
    )
    avg_amount = np.round(np.clip(rng.lognormal(np.log(55.0), 0.6, n_customers), 3.0, 2_000.0), 2)
    std_amount = np.round(avg_amount * rng.uniform(0.3, 1.5, n_customers), 2)
    txn_count = rng.poisson(rng.lognormal(np.log(60.0), 0.7, n_customers)).astype(np.float64)
    risk = np.round(rng.beta(2.0, 6.0, n_customers), 4)
    chargebacks = rng.poisson(0.03 + 1.2 * risk**2).astype(np.float64)
    home_risk = rng.choice(
        np.array([0.05, 0.1, 0.2, 0.4, 0.7]), size=n_customers, p=[0.5, 0.25, 0.15, 0.07, 0.03]
    )
    customer_batch = np.column_stack(
        [age, tenure, credit_limit, avg_amount, std_amount, txn_count, chargebacks, risk, home_risk]
    ).astype(np.float64)
    travel = rng.beta(1.0, 25.0, n_customers)

    cards_per_customer = np.where(rng.random(n_customers) < 0.3, 2, 1)
    card_customer = np.repeat(np.arange(n_customers, dtype=np.int64), cards_per_customer)
    n_cards = card_customer.size
    new_card = rng.random(n_cards) < 0.08
    card_age = np.where(
        new_card, rng.integers(0, 30, n_cards), np.round(rng.exponential(500.0, n_cards)) + 30
    )
    card_age = np.minimum(card_age, tenure[card_customer]).astype(np.float64)
    preapproved = np.round(credit_limit[card_customer] * rng.uniform(0.2, 1.0, n_cards), -1)
    card_batch = np.column_stack([card_age, preapproved]).astype(np.float64)

    cust_of_card = card_customer
    logit = (
        _logit(0.012)
        + 3.0 * (risk[cust_of_card] - 0.25)
        + 1.2 * (card_age < 30)
        + 0.4 * np.minimum(chargebacks[cust_of_card], 3)
        + 1.5 * (home_risk[cust_of_card] - 0.1)
    )
    card_fraud_p = 1.0 / (1.0 + np.exp(-logit))
    activity = (txn_count[cust_of_card] + 1.0) / cards_per_customer[cust_of_card]
    card_activity = activity / activity.sum()

    table = _MCC_TABLE
    mcc_share = np.array([row[2] for row in table])
    mcc_choice = rng.choice(len(table), size=n_merchants, p=mcc_share / mcc_share.sum())
    merchant_mcc = np.array([table[i][0] for i in mcc_choice], dtype=np.int64)
    kinds = [table[i][1] for i in mcc_choice]
    online_mixed = rng.random(n_merchants) < 0.5
    merchant_channel = np.array(
        [
            CHANNEL_ATM
            if kind == "atm"
            else CHANNEL_ECOMMERCE
            if kind == "ecommerce" or (kind == "mixed" and online)
            else CHANNEL_POS
            for kind, online in zip(kinds, online_mixed.tolist(), strict=True)
        ],
        dtype=np.int64,
    )
    amount_factor = np.array([table[i][4] for i in mcc_choice], dtype=np.float64)
    fraud_weight = np.array([table[i][3] for i in mcc_choice], dtype=np.float64)
    popularity = rng.lognormal(0.0, 1.0, n_merchants)
    rate_per_hour = popularity * 8.0
    return DemoPopulation(
        customer_ids=tuple(f"cust-{i:06d}" for i in range(n_customers)),
        card_ids=tuple(f"card-{i:06d}" for i in range(n_cards)),
        merchant_ids=tuple(f"merch-{i:05d}" for i in range(n_merchants)),
        customer_batch=customer_batch,
        card_batch=card_batch,
        card_customer=card_customer,
        card_fraud_p=card_fraud_p,
        card_activity=card_activity,
        customer_travel=travel,
        merchant_mcc=merchant_mcc,
        merchant_channel=merchant_channel,
        merchant_amount_factor=amount_factor,
        merchant_rate_per_hour=rate_per_hour,
        merchant_legit_p=popularity / popularity.sum(),
        merchant_fraud_p=(popularity * fraud_weight) / (popularity * fraud_weight).sum(),
    )


def _sample_requests(rng: np.random.Generator, pop: DemoPopulation, n: int) -> _Requests:
    """Draw ``n`` transactions: entities, label pattern and request-time features."""
    card = rng.choice(len(pop.card_ids), size=n, p=pop.card_activity).astype(np.int64)
    customer = pop.card_customer[card]
    is_fraud = rng.random(n) < pop.card_fraud_p[card]
    u = rng.random(n)
    pattern = np.where(
        is_fraud, np.where(u < 0.4, _BURST, np.where(u < 0.8, _TAKEOVER, _STEALTH)), _LEGIT
    ).astype(np.int64)
    burst, takeover, stealth = pattern == _BURST, pattern == _TAKEOVER, pattern == _STEALTH
    loud = burst | takeover

    n_merchants = len(pop.merchant_ids)
    merchant = np.where(
        loud,
        rng.choice(n_merchants, size=n, p=pop.merchant_fraud_p),
        rng.choice(n_merchants, size=n, p=pop.merchant_legit_p),
    ).astype(np.int64)
    channel = pop.merchant_channel[merchant]
    mcc = pop.merchant_mcc[merchant]
    card_present = channel != CHANNEL_ECOMMERCE

    hour = np.where(
        takeover & (rng.random(n) < 0.5),
        rng.choice(24, size=n, p=_NIGHT_P),
        np.where(burst, rng.integers(0, 24, n), rng.choice(24, size=n, p=_DIURNAL_P)),
    )
    day = np.where(is_fraud, rng.integers(0, 7, n), rng.choice(7, size=n, p=_WEEKDAY_P))

    travel = pop.customer_travel[customer]
    p_intl = np.select(
        [burst, takeover, stealth],
        [np.full(n, 0.35), np.full(n, 0.55), 2.0 * travel + 0.05],
        default=travel + 0.05 * (channel == CHANNEL_ECOMMERCE),
    )
    international = rng.random(n) < p_intl

    batch = pop.customer_batch
    avg = batch[customer, CUSTOMER_BATCH_FEATURES.index("avg_amount_90d")]
    std = batch[customer, CUSTOMER_BATCH_FEATURES.index("std_amount_90d")]
    sigma = np.clip(std / avg, 0.3, 1.0)
    typical = avg * pop.merchant_amount_factor[merchant] ** 0.5
    amount = typical * rng.lognormal(-0.5 * sigma**2, sigma)
    amount = np.where(rng.random(n) < 0.01, amount * rng.uniform(3.0, 10.0, n), amount)
    amount = np.where(stealth, amount * 1.4, amount)
    amount = np.where(takeover, avg * np.exp(rng.uniform(np.log(4.0), np.log(40.0), n)), amount)
    card_test = burst & (rng.random(n) < 0.6)
    amount = np.where(card_test, rng.uniform(0.5, 5.0, n), amount)
    amount = np.where(
        channel == CHANNEL_ATM, np.maximum(20.0, np.round(amount / 20.0) * 20.0), amount
    )
    amount = np.maximum(0.5, np.round(amount, 2))

    distance = np.where(
        card_present,
        np.minimum(rng.lognormal(np.log(6.0), 1.1, n), 2_000.0),
        rng.lognormal(np.log(4.0), 1.3, n),
    )
    distance = np.where(takeover, rng.lognormal(np.log(150.0), 1.2, n), distance)
    distance = np.where(international, rng.uniform(300.0, 9_000.0, n), distance)
    distance = np.round(np.minimum(distance, 20_000.0), 1)

    values = np.column_stack(
        [amount, mcc, channel, hour, day, international, card_present, distance]
    ).astype(np.float64)
    return _Requests(
        card=card, customer=customer, merchant=merchant, pattern=pattern, values=values
    )


def _stream_features(rng: np.random.Generator, pop: DemoPopulation, req: _Requests) -> FloatArray:
    """Card windows over earlier events plus the merchant's 1 h count, [n, 11]."""
    n = req.card.size
    batch = pop.customer_batch
    avg = batch[req.customer, CUSTOMER_BATCH_FEATURES.index("avg_amount_90d")]
    rate = (batch[req.customer, CUSTOMER_BATCH_FEATURES.index("txn_count_90d")] + 0.5) / (90 * 24)
    travel = pop.customer_travel[req.customer]
    card_age = pop.card_batch[req.card, CARD_BATCH_FEATURES.index("card_age_days")]

    # Ordinary earlier events: a few a day, clustered into shopping sessions.
    n_legit = rng.poisson(rate * 24.0 * rng.gamma(2.0, 0.5, n))
    rows = np.repeat(np.arange(n), n_legit)
    u = rng.random(rows.size)
    ages = np.where(
        u < 0.012,
        rng.uniform(0.0, _FIVE_MIN, rows.size),
        np.where(
            u < 0.08, rng.uniform(_FIVE_MIN, _HOUR, rows.size), rng.uniform(_HOUR, _DAY, rows.size)
        ),
    )
    amounts = avg[rows] * rng.lognormal(-0.18, 0.6, rows.size)
    intl = rng.random(rows.size) < travel[rows]

    # Fraud-specific earlier events.
    extra = np.select(
        [req.pattern == _BURST, req.pattern == _TAKEOVER, req.pattern == _STEALTH],
        [2 + rng.poisson(5.0, n), rng.poisson(1.5, n), rng.poisson(0.5, n)],
        default=0,
    )
    f_rows = np.repeat(np.arange(n), extra)
    f_pattern = req.pattern[f_rows]
    m = f_rows.size
    f_ages = np.select(
        [f_pattern == _BURST, f_pattern == _TAKEOVER],
        [
            np.where(rng.random(m) < 0.6, rng.uniform(0, _FIVE_MIN, m), rng.uniform(0, 1_800, m)),
            rng.uniform(0.0, 6 * _HOUR, m),
        ],
        default=rng.uniform(0.0, _DAY, m),
    )
    f_amounts = np.select(
        [f_pattern == _BURST, f_pattern == _TAKEOVER],
        [rng.uniform(0.5, 10.0, m), avg[f_rows] * rng.uniform(3.0, 20.0, m)],
        default=avg[f_rows] * rng.lognormal(0.0, 0.6, m),
    )
    f_intl = rng.random(m) < np.where(f_pattern == _STEALTH, travel[f_rows] + 0.05, 0.4)

    rows = np.concatenate([rows, f_rows])
    ages = np.concatenate([ages, f_ages])
    amounts = np.maximum(0.5, np.round(np.concatenate([amounts, f_amounts]), 2))
    intl = np.concatenate([intl, f_intl])

    count_5m = np.bincount(rows, weights=ages < _FIVE_MIN, minlength=n)
    in_hour = ages < _HOUR
    count_1h = np.bincount(rows, weights=in_hour, minlength=n)
    count_24h = np.bincount(rows, minlength=n).astype(np.float64)
    sum_1h = np.bincount(rows, weights=amounts * in_hour, minlength=n)
    sum_24h = np.bincount(rows, weights=amounts, minlength=n)
    max_24h = np.zeros(n)
    np.maximum.at(max_24h, rows, amounts)
    mean_24h = np.divide(sum_24h, count_24h, out=np.zeros(n), where=count_24h > 0)
    intl_24h = np.bincount(rows, weights=intl, minlength=n)

    # Most recent earlier event per row: sort by (row, age), take each row's first.
    order = np.lexsort((ages, rows))
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if rows.size else order
    since_last = np.full(n, SECONDS_SINCE_LAST_CAP)
    last_amount = np.zeros(n)
    # Older than 24 h for cards with some history.
    has_history = card_age >= 1
    older = np.minimum(_DAY + rng.exponential(1.0 / rate) * _HOUR, SECONDS_SINCE_LAST_CAP)
    since_last = np.where(has_history, older, since_last)
    last_amount = np.where(
        has_history, np.maximum(0.5, np.round(avg * rng.lognormal(-0.18, 0.6, n), 2)), last_amount
    )
    since_last[rows[first]] = np.round(ages[first])
    last_amount[rows[first]] = amounts[first]

    merchant_rate = pop.merchant_rate_per_hour[req.merchant]
    hour = req.values[:, REQUEST_FEATURES.index("hour_of_day")].astype(np.int64)
    merchant_1h = rng.poisson(merchant_rate * _DIURNAL[hour] / _DIURNAL.mean())
    merchant_1h = merchant_1h + np.where(req.pattern == _BURST, rng.poisson(3.0, n), 0)

    return np.column_stack(
        [
            count_5m,
            count_1h,
            count_24h,
            np.round(sum_1h, 2),
            np.round(sum_24h, 2),
            max_24h,
            np.round(mean_24h, 2),
            since_last,
            last_amount,
            intl_24h,
            merchant_1h,
        ]
    ).astype(np.float64)


def sample_transaction(
    rng: np.random.Generator, population: DemoPopulation
) -> SyntheticTransaction:
    """Draw one transaction: request-time features plus customer/card/merchant ids."""
    return sample_transactions(rng, population, 1)[0]


def sample_transactions(
    rng: np.random.Generator, population: DemoPopulation, n: int
) -> list[SyntheticTransaction]:
    """Draw ``n`` transactions at once: each draw picks among every card, so one call
    for many costs about as much as one call for one (prefer it in loops)."""
    req = _sample_requests(rng, population, n)
    values = req.values.tolist()
    return [
        SyntheticTransaction(
            customer_id=population.customer_ids[customer],
            card_id=population.card_ids[card],
            merchant_id=population.merchant_ids[merchant],
            is_fraud=pattern != _LEGIT,
            pattern=FRAUD_PATTERNS[pattern],
            request=dict(zip(REQUEST_FEATURES, row, strict=True)),
        )
        for customer, card, merchant, pattern, row in zip(
            req.customer.tolist(),
            req.card.tolist(),
            req.merchant.tolist(),
            req.pattern.tolist(),
            values,
            strict=True,
        )
    ]


def generate_dataset(
    n_rows: int, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Labelled rows: ``X`` float32 ``[n_rows, 30]`` in :data:`DEMO_FEATURES` order, ``y`` 0/1."""
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    rng = np.random.default_rng(seed)
    pop = make_population(rng)
    req = _sample_requests(rng, pop, n_rows)
    stream = _stream_features(rng, pop, req)
    x = np.hstack(
        [req.values, pop.customer_batch[req.customer], pop.card_batch[req.card], stream]
    ).astype(np.float32)
    y = (req.pattern != _LEGIT).astype(np.int64)
    return x, y

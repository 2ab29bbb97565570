"""The fast path of intake validation (``valid_order``) against the full walk.

``validate_order`` takes a plainly valid order through ``valid_order`` and
anything else through ``validate_full``, whose errors are the wire contract's
``rejected`` reply. Here both answer many generated orders, valid ones and
near-valid or poisoned ones (wrong types, bools where ints belong, unknown
fields, NUL characters, huge ints, duplicate ids, totals that overflow,
unicode, deep attributes), and must answer the same: the same normalised
order (key for key, in the same order, with the same types) or the same
errors.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import msgpack
import pytest

from oms import codec
from oms.order_rules import ACTIONS, MAX_AMOUNT_MINOR
from oms.sample import sample_orders
from oms.validation import validate_full, validate_order
from oms.validation_fast import valid_order

TYPES = ("retail", "telecom")

POISON: list[Any] = [
    None, True, False, 0, 1, -1, 2, 10**9, 10**9 + 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63,
    2**64 - 1, -(2**63), 1.0, 0.5, -0.0, math.nan, math.inf, "", " ", "\t\n", "\x00",
    "a\x00b", "x" * 1000, "x" * 1001, " " * 1001, "ÄÖÜ", "日本", "\U0001f600", "de", "DE",
    "DEU", "EUR", "eur", "EUR\n", "EU", "add", "modify", "delete", "noChange", "remove",
    "retail", "telecom", "gift", "line-1", b"bytes", b"x" * 1001, [], [1, 2], {}, {"a": 1},
    {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}, {1: "int key"},
    [{"id": "x"}], {"id": "c1"},
]
EDGES: dict[str, list[Any]] = {  # each field's boundaries, tried more often than POISON's
    "quantity": [0, 1, 10**9, 10**9 + 1, -1, True, 1.0, None],
    "unit_price_minor": [0, -1, 2**62, 2**63 - 1, 2**63, 3 * 10**9, False, 0.0, None],
    "source_system": ["s\x00", "\x00", " s", "", "s" * 1000, "s" * 1001, None],
    "external_id": ["e\x00", " ", "e" * 1001, None, 1],
    "country": ["de", "DE ", "D", "DEU", "ÄÖ", None],
    "currency": ["EU", "eur", "EUR\n", "US$", None],
    "action": [None, "Add", "add ", *ACTIONS],
    "service_id": [None, "", " ", "s" * 1001, 1],
    "order_type": [None, "gift", "Retail", *TYPES],
    "name": [None, "", " ", "n" * 1001, 1, []],
    "id": [None, "", " ", "line-1", "a", "i" * 1001, 1],
}
UNKNOWN = ["typo", "Items", "quantity ", "", "\x00", "ID"]


def rich_order(rng: random.Random) -> dict[str, Any]:
    """A valid order with the optional fields the samples leave out."""
    address = {"line1": "1 Road", "line2": "Flat 2", "city": "Köln", "postal_code": "50667",
               "region": "NRW", "country": "DE"}
    return {
        "source_system": "shop-ü", "external_id": f"R-{rng.randint(0, 10**6)}",
        "order_type": rng.choice(TYPES), "currency": "USD",
        "customer": {"id": "c-1", "name": "N", "email": "e@x", "phone": "+49"},
        "customer_address": address,
        "delivery_address": dict(address, line1="2 Other Road", region=None),
        "attributes": {"gift": True, "note": "x" * 1000, "tags": ["a", {"b": [1, 2.5]}],
                       "nested": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}},
        "items": [
            {"id": "a", "action": "add", "product_id": "P1", "quantity": 10**9,
             "unit_price_minor": 0, "attributes": None},
            {"id": "b", "action": "modify", "product_id": "P2", "quantity": 1,
             "service_id": "svc-1", "attributes": {"speed": 1000}},
            {"id": "c", "action": "delete", "product_id": "P3", "service_id": "svc-2"},
            {"id": "d", "action": "noChange", "product_id": "P4", "service_id": None,
             "unit_price_minor": MAX_AMOUNT_MINOR},
            {"id": "e", "product_id": "P5", "quantity": 2, "unit_price_minor": 7,
             "service_id": "s"},
        ],
    }


def bases(rng: random.Random) -> list[dict[str, Any]]:
    seed = rng.randint(0, 10**6)
    return [*sample_orders(3, seed=seed, telecom_ratio=0.5), rich_order(rng)]


def nodes(value: Any) -> list[Any]:
    """Every map and list inside ``value`` (itself included)."""
    found = [value]
    children = value.values() if isinstance(value, dict) else value
    for child in children:
        if isinstance(child, dict | list):
            found += nodes(child)
    return found


def mutate(order: dict[str, Any], rng: random.Random) -> None:
    node = rng.choice(nodes(order))
    roll = rng.random()
    if isinstance(node, list):
        if node and roll < 0.3:
            node.append(copy.deepcopy(rng.choice(node)))  # a duplicate id, as likely as not
        elif node and roll < 0.5:
            node.pop(rng.randrange(len(node)))
        elif node:
            node[rng.randrange(len(node))] = copy.deepcopy(rng.choice(POISON))
        else:
            node.append(copy.deepcopy(rng.choice(POISON)))
        return
    keys = list(node)
    if roll < 0.1 or not keys:
        node[rng.choice(UNKNOWN)] = rng.choice(POISON)
    elif roll < 0.3:
        del node[rng.choice(keys)]
    elif roll < 0.6 and (edged := [k for k in keys if k in EDGES]):
        key = rng.choice(edged)
        node[key] = rng.choice(EDGES[key])
    else:
        node[rng.choice(keys)] = copy.deepcopy(rng.choice(POISON))


def same(raw: Any) -> bool:
    """Both paths give the same answer for ``raw``; True if it is valid."""
    before = repr(raw)
    fast, fast_errs = validate_order(copy.deepcopy(raw), TYPES)
    full, full_errs = validate_full(copy.deepcopy(raw), TYPES)
    assert repr(fast) == repr(full)  # keys, their order, values and their types
    assert fast_errs == full_errs
    assert (valid_order(raw, TYPES) is not None) == (full is not None)  # valid: fast path
    assert repr(raw) == before  # the input is not changed
    if full is not None and fast is not None:
        assert (fast["delivery_address"] is fast["customer_address"]) == (
            full["delivery_address"] is full["customer_address"])
        assert codec.digest(fast) == codec.digest(full)  # the dedup fingerprint
    return full is not None


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_answers_as_the_full_walk(seed: int) -> None:
    rng = random.Random(seed)
    valid = invalid = 0
    for _ in range(1500):
        for base in bases(rng):
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                mutate(base, rng)
            if same(msgpack.unpackb(msgpack.packb(base), strict_map_key=False)):  # as decoded
                valid += 1
            else:
                invalid += 1
    assert valid > 1000 and invalid > 1000  # both kinds were tried, many times


@pytest.mark.parametrize("raw", [
    None, [], "order", {}, {"items": []},
    {**next(sample_orders(1)), "customer": {"id": "c", "name": 1}},
    {**next(sample_orders(1)), "external_id": " "},
    {**next(sample_orders(1)), "source_system": "shop\x00"},
    {**next(sample_orders(1)), "currency": "EUR\n"},
    {**next(sample_orders(1)), "order_type": None},
    {**next(sample_orders(1)), "items": [{"id": "a", "product_id": "p", "quantity": True}]},
    {**next(sample_orders(1)), "items": [{"id": "a", "product_id": "p", "quantity": 1.0}]},
    {**next(sample_orders(1)), "items": [{"id": "a", "product_id": "p", "quantity": 2,
                                          "unit_price_minor": 2**62}]},
    {**next(sample_orders(1)), "items": [{"id": "a", "product_id": "p", "quantity": 1,
                                          "unit_price_minor": 2**62}] * 2},
    {**next(sample_orders(1)), "items": [{"id": "a", "product_id": "p", "quantity": 1,
                                          "unit_price_minor": 2**62},
                                         {"id": "b", "product_id": "p", "quantity": 1,
                                          "unit_price_minor": 2**62}]},
    {**next(sample_orders(1)), "items": [{"id": "a", "product_id": "p", "action": "delete"}]},
    {**next(sample_orders(1)), "items": [{"id": "a", "product_id": "p", "action": "noChange",
                                          "quantity": None}]},
    {**next(sample_orders(1)), "attributes": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {
        "h": 1}}}}}}}}},
    {**next(sample_orders(1)), "attributes": {b"k": 1}},
    {**next(sample_orders(1)), "attributes": {"k": b"v"}},
    {**next(sample_orders(1)), "attributes": {"k": [1, float("nan")]}},
    {**next(sample_orders(1)), "attributes": {"k": 2**63, "j": -2**63 - 1}},
    {**next(sample_orders(1)), "attributes": {"k": 2**63 - 1, "j": -2**63, "f": 1.5e300}},
    {**next(sample_orders(1)), "customer_address": {"line1": "x", "city": "y",
                                                    "postal_code": "z", "country": "D E"}},
])
def test_hostile_orders_answer_alike(raw: Any) -> None:
    same(raw)


def test_int_and_str_subclasses_take_the_full_walk() -> None:
    """Not what msgpack decodes: the fast path declines, the full walk decides
    (``IntEnum`` quantities and ``str`` subclasses pass it as before)."""
    import enum

    class Qty(enum.IntEnum):
        ONE = 1

    class Name(str):
        __slots__ = ()

    raw = next(sample_orders(1))
    raw["items"][0]["quantity"] = Qty.ONE
    raw["external_id"] = Name("E-1")
    assert valid_order(raw, TYPES) is None
    order, errs = validate_order(raw, TYPES)
    assert errs == [] and order is not None and order["items"][0]["quantity"] is Qty.ONE

"""Intake validation as a plain function: every rule of the order table."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from helpers import retail_order
from hypothesis import given, settings
from hypothesis import strategies as st

from oms.validation import validate_order

TYPES = ("retail", "telecom")


def errors_of(order: Any) -> dict[str, str]:
    result, errs = validate_order(order, TYPES)
    assert (result is None) == bool(errs)
    return {e.field: e.message for e in errs}


def test_valid_order_gets_defaults() -> None:
    order, errs = validate_order(retail_order(), TYPES)
    assert errs == []
    assert order is not None
    assert order["order_type"] == "retail"
    assert order["currency"] == "EUR"
    assert order["delivery_address"] == order["customer_address"]
    assert order["items"][0]["action"] == "add"
    assert order["attributes"] == {}


def test_every_error_is_reported_at_once_with_paths() -> None:
    bad = retail_order(currency="eur", order_type="gift")
    bad["items"][0]["quantity"] = 0
    bad["items"][1]["unit_price_minor"] = -1
    del bad["customer"]["id"]
    del bad["customer_address"]["city"]
    errs = errors_of(bad)
    assert set(errs) == {
        "currency", "order_type", "items[0].quantity", "items[1].unit_price_minor",
        "customer.id", "customer_address.city",
    }


@pytest.mark.parametrize("field", ["source_system", "external_id", "customer",
                                   "customer_address", "items"])
def test_required_fields(field: str) -> None:
    bad = retail_order()
    del bad[field]
    assert errors_of(bad)[field] == "required"


@pytest.mark.parametrize(("item", "field", "fragment"), [
    ({"id": "a", "product_id": "p"}, "items[0].quantity", "required for action add"),
    ({"id": "a", "product_id": "p", "action": "modify", "quantity": 1},
     "items[0].service_id", "required"),
    ({"id": "a", "product_id": "p", "action": "delete"}, "items[0].service_id", "required"),
    ({"id": "a", "product_id": "p", "action": "upgrade", "quantity": 1},
     "items[0].action", "must be one of"),
    ({"id": "a", "product_id": "p", "quantity": True}, "items[0].quantity", "integer"),
    ({"id": "a", "product_id": "p", "quantity": 1.5}, "items[0].quantity", "integer"),
    ({"id": "a", "product_id": 7, "quantity": 1}, "items[0].product_id", "string"),
    ({"id": "a", "product_id": "p", "quantity": 1, "colour": "red"}, "items[0].colour",
     "unknown field"),
    ({"id": "a", "product_id": "p", "quantity": 1, "attributes": []},
     "items[0].attributes", "map"),
])
def test_item_rules(item: dict, field: str, fragment: str) -> None:
    assert fragment in errors_of(retail_order(items=[item]))[field]


def test_delete_and_nochange_need_no_quantity() -> None:
    items = [{"id": "a", "product_id": "p", "action": "delete", "service_id": "s"},
             {"id": "b", "product_id": "q", "action": "noChange"}]
    assert errors_of(retail_order(items=items, order_type="telecom")) == {}


def test_item_ids_must_be_unique() -> None:
    items = [{"id": "a", "product_id": "p", "quantity": 1}] * 2
    assert "duplicate" in errors_of(retail_order(items=items))["items[1].id"]


@pytest.mark.parametrize("items", [[], [{"id": str(i), "product_id": "p", "quantity": 1}
                                        for i in range(1001)]])
def test_item_count_limits(items: list) -> None:
    assert "1 to 1000" in errors_of(retail_order(items=items))["items"]


def test_string_length_limit() -> None:
    assert "1000" in errors_of(retail_order(external_id="x" * 1001))["external_id"]


def test_attributes_depth_limit() -> None:
    deep: dict[str, Any] = {"v": 1}
    for _ in range(8):
        deep = {"n": deep}
    errs = errors_of(retail_order(attributes=deep))
    assert any("deeper than 8" in m for m in errs.values())
    shallow: dict[str, Any] = {"v": 1}
    for _ in range(6):
        shallow = {"n": shallow}
    assert errors_of(retail_order(attributes=shallow)) == {}


def test_attributes_keys_must_be_strings() -> None:
    for attributes in ({b"k": 1}, {1: "v"}, {"n": {b"k": "v"}}, {"l": [{None: 1}]}):
        errs = errors_of(retail_order(attributes=attributes))
        assert any("keys must be strings" in m for m in errs.values()), attributes


def test_attributes_hold_only_what_a_domain_reply_may_carry_back() -> None:
    """Attributes go out in commands and may come back in replies and
    events, whose ``data`` may not hold binary, NaN, infinity or an integer
    outside signed 64 bits (``invalid_reply``): such a value is refused at
    intake, on the order and on an item, with its path, so one order cannot
    fail the later orders a domain system echoes it to. The bounds pass."""
    bad = {"bin": b"x", "nan": math.nan, "inf": math.inf, "ninf": -math.inf,
           "big": 2**63, "small": -2**63 - 1, "huge": 1e19, "deep": [{"x": b""}]}
    errs = errors_of(retail_order(attributes=bad))
    assert errs == {"attributes.bin": "binary values are not allowed",
                    "attributes.nan": "must be a finite number",
                    "attributes.inf": "must be a finite number",
                    "attributes.ninf": "must be a finite number",
                    "attributes.big": "numbers must be within signed 64 bits",
                    "attributes.small": "numbers must be within signed 64 bits",
                    "attributes.huge": "numbers must be within signed 64 bits",
                    "attributes.deep[0].x": "binary values are not allowed"}, errs
    item = dict(retail_order()["items"][0], attributes={"n": math.nan})
    assert errors_of(retail_order(items=[item])) == {
        "items[0].attributes.n": "must be a finite number"}
    edge = {"max": 2**63 - 1, "min": -2**63, "f": -9.2e18, "t": True, "none": None, "s": "x"}
    assert errors_of(retail_order(attributes=edge)) == {}


def test_reply_and_event_data_keys_must_be_strings() -> None:
    from oms import edge
    assert "not a string" in (edge.check_data({b"k": 1}) or "")
    assert "not a string" in (edge.check_data({"a": [{1: 2}]}) or "")
    assert edge.check_data({"a": [{"b": 2}]}) is None


def test_address_country_and_unknown_fields() -> None:
    bad = retail_order(delivery_address={"line1": "x", "city": "y", "postal_code": "1",
                                         "country": "Germany", "floor": 3})
    errs = errors_of(bad)
    assert "alpha-2" in errs["delivery_address.country"]
    assert errs["delivery_address.floor"] == "unknown field"


def test_unknown_top_level_field() -> None:
    assert errors_of(retail_order(priority="high"))["priority"] == "unknown field"


def test_not_a_map() -> None:
    assert errors_of(["not", "a", "map"]) == {"order": "required: a map"}


_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                         st.integers(),
                                                                         max_size=2))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["source_system", "external_id", "order_type", "customer",
                              "customer_address", "delivery_address", "currency", "items",
                              "attributes"]), value=_values)
def test_any_wrong_value_in_any_field_is_an_error_not_a_crash(field: str, value: Any) -> None:
    order = retail_order()
    order[field] = value
    result, errs = validate_order(copy.deepcopy(order), TYPES)
    assert (result is None) == bool(errs)
    for e in errs:
        assert e.field and e.message


@settings(max_examples=200, deadline=None)
@given(item_field=st.sampled_from(["id", "action", "product_id", "quantity",
                                   "unit_price_minor", "service_id", "attributes"]),
       value=_values)
def test_any_wrong_item_value_names_its_path(item_field: str, value: Any) -> None:
    order = retail_order()
    order["items"][1][item_field] = value
    _result, errs = validate_order(order, TYPES)
    assert all(e.field.startswith(("items[1]", "items")) for e in errs)


# -- amounts: every total fits in a signed 64-bit integer (issue 12, defect 2) --

MAX = 2**63 - 1


def _priced(*lines: tuple[int, int], action: str = "add") -> dict[str, Any]:
    return retail_order(items=[{"id": f"i{n}", "product_id": "p", "quantity": q,
                                "unit_price_minor": p, "action": action}
                               for n, (p, q) in enumerate(lines)])


@pytest.mark.parametrize(("lines", "field"), [
    ([(2**64 - 1, 1)], "items[0].unit_price_minor"),  # the reported order
    ([(MAX + 1, 1)], "items[0].unit_price_minor"),
    ([(1, 10**9 + 1)], "items[0].quantity"),
    ([(2**62, 2)], "items[0].unit_price_minor"),  # a line total over the bound
    ([(MAX, 1), (1, 1)], "items[1].unit_price_minor"),  # the sum crosses at item 1
    ([(MAX // 2 + 1, 1), (0, 5), (MAX // 2 + 1, 1)], "items[2].unit_price_minor"),
])
def test_amounts_that_overflow_64_bits_are_refused_with_the_item_path(
        lines: list[tuple[int, int]], field: str) -> None:
    errs = errors_of(_priced(*lines))
    assert list(errs) == [field], errs
    assert "2^63-1" in errs[field] or "1000000000" in errs[field]


def test_overflowing_delete_items_are_not_charged_and_a_bad_item_keeps_its_path() -> None:
    # delete and noChange items are not charged: their prices do not add up
    order = _priced((MAX, 1), (MAX, 1))
    order["items"][1]["action"] = "noChange"
    assert errors_of(order) == {}
    order = _priced((MAX, 1), (1, 1))
    order["items"].insert(0, "not a map")  # skipped entries do not shift the paths
    assert set(errors_of(order)) == {"items[0]", "items[2].unit_price_minor"}


def test_orders_at_the_bound_are_accepted_and_always_encode() -> None:
    """Max values at the bound, many items at the bound, a total of exactly
    2^63-1: accepted, and the snapshot and every command encode."""
    from helpers import Driver, ok_domain

    from oms import codec, snapshot
    from oms.process import builtin_processes

    per, n = MAX // 1000, 1000
    many = [(per, 1)] * (n - 1) + [(MAX - per * (n - 1), 1)]
    for lines in ([(MAX, 1)], [(1, 10**9)], many, [(per // 10**9, 10**9)] * n):
        order = _priced(*lines)
        assert errors_of(order) == {}
        for name in ("retail", "telecom"):
            raw = copy.deepcopy(order)
            raw["order_type"] = name
            d = Driver(builtin_processes()[name], raw, ok_domain())
            d.start()
            assert d.order.total_minor <= MAX
            snapshot.encode(d.order)
            for cmd in d.sent:
                codec.pack({"args": cmd.args})
        assert sum(p * q for p, q in lines) <= MAX
    assert sum(p for p, _ in many) == MAX


def test_an_order_stored_before_the_bound_fails_cleanly_instead_of_never_encoding() -> None:
    from helpers import Driver, ok_domain

    from oms.process import builtin_processes
    from oms.states import OrderState

    d = Driver(builtin_processes()["retail"], retail_order(), ok_domain())
    d.order.items[0]["unit_price_minor"] = 2**64 - 1  # accepted by an older release
    d.start()
    assert (d.order.state, d.order.state_reason) == (OrderState.FAILED, "amount_out_of_range")
    assert [s.system for s in d.sent] == ["crm"]  # told, nothing else sent
    from oms import snapshot

    snapshot.encode(d.order)



def test_optional_fields_absent_none_or_wrong() -> None:
    """The fast paths for absent optional fields (session 4) keep every rule:
    None is the same as absent, a wrong value still fails with its path."""
    raw = retail_order()
    raw["customer"].update(email=None, phone=None)
    raw["customer_address"].update(line2=None, region=None)
    raw["items"][0]["service_id"] = None
    order, errs = validate_order(raw, TYPES)
    assert errs == [] and order is not None
    assert "email" not in order["customer"] and "line2" not in order["customer_address"]
    assert "service_id" not in order["items"][0]
    bad = retail_order()
    bad["customer"]["phone"] = 5
    bad["customer_address"]["region"] = ""
    bad["items"][0]["service_id"] = ["x"]
    bad["items"][0][b"raw"] = 1
    bad["items"][0]["quantity"] = 1.0
    assert errors_of(bad) == {
        "customer.phone": "must be a string, got int",
        "items[0].service_id": "must be a string, got list",
        "items[0].b'raw'": "unknown field",
        "items[0].quantity": "must be an integer from 1 to 1000000000",
    }

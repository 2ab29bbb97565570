"""Intake validation of ``submit_order.order`` (contract §1, "The order").

``validate_order`` reports every field error at once, each with a path such
as ``items[0].quantity``, and returns the order normalised with its defaults
filled in. Unknown fields are errors too: a typo in a field name must not be
silently ignored. ``attributes`` maps are free-form but bounded. The
limits and formats are ``oms.order_rules``; a plainly valid order takes the
fast path (``oms.validation_fast``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from oms.errors import FieldError
from oms.order_rules import (
    ACTIONS,
    ADDRESS_FIELDS,
    COUNTRY,
    CURRENCY,
    CUSTOMER_FIELDS,
    ITEM_FIELDS,
    MAX_AMOUNT_MINOR,
    MAX_ITEMS,
    MAX_QUANTITY,
    MAX_STR,
    ORDER_FIELDS,
    check_attributes,
    given,
)
from oms.validation_fast import valid_order


class _Errors(list[FieldError]):
    def add(self, field: str, message: str) -> None:
        self.append(FieldError(field, message))


def _unknown(raw: dict[str, Any], allowed: set[str], path: str, errs: _Errors) -> None:
    if allowed.issuperset(raw):  # the common case, in C
        return
    for key in raw:
        if key not in allowed:
            errs.add(f"{path}.{key}" if path else str(key), "unknown field")


def _string(
    raw: dict[str, Any], key: str, path: str, errs: _Errors, *, required: bool
) -> str | None:
    value = raw.get(key)
    if type(value) is str and len(value) <= MAX_STR and (not required or value.strip()):
        return value  # the common case: no field name to format
    field = f"{path}.{key}" if path else key
    if value is None:
        if required:
            errs.add(field, "required")
        return None
    if not isinstance(value, str):
        errs.add(field, f"must be a string, got {type(value).__name__}")
        return None
    if required and not value.strip():
        errs.add(field, "must not be empty")
        return None
    if len(value) > MAX_STR:
        errs.add(field, f"at most {MAX_STR} characters")
        return None
    return value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _attributes(raw: dict[str, Any], path: str, errs: _Errors) -> dict[str, Any]:
    field = f"{path}.attributes" if path else "attributes"
    value = raw.get("attributes")
    if value is None:
        return {}
    if not isinstance(value, dict):
        errs.add(field, "must be a map")
        return {}
    check_attributes(value, field, errs)
    return value


def _map(raw: dict[str, Any], key: str, errs: _Errors, *, required: bool) -> dict | None:
    value = raw.get(key)
    if value is None:
        if required:
            errs.add(key, "required")
        return None
    if not isinstance(value, dict):
        errs.add(key, f"must be a map, got {type(value).__name__}")
        return None
    return value


def _address(raw: dict[str, Any], path: str, errs: _Errors) -> dict[str, Any]:
    _unknown(raw, ADDRESS_FIELDS, path, errs)
    out: dict[str, Any] = {}
    for key in ("line1", "city", "postal_code", "country"):
        out[key] = _string(raw, key, path, errs, required=True)
    for key in ("line2", "region"):
        if raw.get(key) is None:  # absent: nothing to check
            continue
        value = _string(raw, key, path, errs, required=False)
        if value is not None:
            out[key] = value
    if out["country"] is not None and not COUNTRY.fullmatch(out["country"]):
        errs.add(f"{path}.country",
                 "must be two upper-case letters (an ISO 3166-1 alpha-2 code such as DE)")
    return out


def _customer(raw: dict[str, Any], errs: _Errors) -> dict[str, Any]:
    _unknown(raw, CUSTOMER_FIELDS, "customer", errs)
    out: dict[str, Any] = {"id": _string(raw, "id", "customer", errs, required=True)}
    for key in ("name", "email", "phone"):
        if raw.get(key) is None:  # absent: nothing to check
            continue
        value = _string(raw, key, "customer", errs, required=False)
        if value is not None:
            out[key] = value
    return out


def _item(raw: Any, path: str, errs: _Errors) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        errs.add(path, "must be a map")
        return None
    _unknown(raw, ITEM_FIELDS, path, errs)
    item: dict[str, Any] = {
        "id": _string(raw, "id", path, errs, required=True),
        "product_id": _string(raw, "product_id", path, errs, required=True),
    }
    action = given(raw, "action", "add")
    if action not in ACTIONS:
        errs.add(f"{path}.action", f"must be one of {', '.join(ACTIONS)}")
        action = "add"
    item["action"] = action
    quantity = raw.get("quantity")
    if quantity is None:
        if action in ("add", "modify"):
            errs.add(f"{path}.quantity", f"required for action {action}")
        item["quantity"] = 1
    elif not (type(quantity) is int or _int(quantity)) or not 0 < quantity <= MAX_QUANTITY:
        errs.add(f"{path}.quantity", f"must be an integer from 1 to {MAX_QUANTITY}")
    else:
        item["quantity"] = quantity
    price = raw.get("unit_price_minor")
    if price is not None:
        if not (type(price) is int or _int(price)) or not 0 <= price <= MAX_AMOUNT_MINOR:
            errs.add(f"{path}.unit_price_minor",
                     f"must be an integer from 0 to {MAX_AMOUNT_MINOR} (2^63-1)")
        else:
            item["unit_price_minor"] = price
    needs_service = action in ("modify", "delete")
    if needs_service or raw.get("service_id") is not None:
        service_id = _string(raw, "service_id", path, errs, required=needs_service)
        if service_id is not None:
            item["service_id"] = service_id
    item["attributes"] = _attributes(raw, path, errs)
    return item


def _items(raw: Any, errs: _Errors) -> list[dict[str, Any]]:
    if raw is None:
        errs.add("items", "required")
        return []
    if not isinstance(raw, list):
        errs.add("items", "must be a list")
        return []
    if not 1 <= len(raw) <= MAX_ITEMS:
        errs.add("items", f"must hold 1 to {MAX_ITEMS} items")
        return []
    items, where, seen = [], [], set()
    for i, entry in enumerate(raw):
        item = _item(entry, f"items[{i}]", errs)
        if item is None:
            continue
        if item["id"] is not None:
            if item["id"] in seen:
                errs.add(f"items[{i}].id", f"duplicate item id {item['id']!r}")
            seen.add(item["id"])
        items.append(item)
        where.append(i)
    _check_totals(items, where, errs)
    return items


def _check_totals(items: list[dict[str, Any]], where: list[int], errs: _Errors) -> None:
    """Each line total and the running order total must stay within
    ``MAX_AMOUNT_MINOR``; the first item that crosses it is named."""
    total = 0
    for i, item in zip(where, items, strict=True):
        if item["action"] not in ("add", "modify"):
            continue
        line = item.get("unit_price_minor", 0) * item.get("quantity", 1)
        total += line
        if line > MAX_AMOUNT_MINOR:
            errs.add(f"items[{i}].unit_price_minor", "unit_price_minor * quantity exceeds "
                     f"{MAX_AMOUNT_MINOR} (2^63-1)")
            return
        if total > MAX_AMOUNT_MINOR:
            errs.add(f"items[{i}].unit_price_minor", "the order total (sum of unit_price_minor"
                     f" * quantity) would exceed {MAX_AMOUNT_MINOR} (2^63-1)")
            return


def validate_order(
    raw: Any, order_types: Collection[str]
) -> tuple[dict[str, Any] | None, list[FieldError]]:
    """Validate and normalise an order map.

    Returns ``(order, [])`` when valid, else ``(None, errors)`` with every
    error found. A plainly valid order takes the fast path (``valid_order``);
    anything else, the full walk that names every error.
    """
    order = valid_order(raw, order_types)
    if order is not None:
        return order, []
    return validate_full(raw, order_types)


def validate_full(
    raw: Any, order_types: Collection[str]
) -> tuple[dict[str, Any] | None, list[FieldError]]:
    """``validate_order`` without its fast path: every check, every error."""
    errs = _Errors()
    if not isinstance(raw, dict):
        errs.add("order", "required: a map")
        return None, errs
    _unknown(raw, ORDER_FIELDS, "", errs)
    order: dict[str, Any] = {
        "source_system": _string(raw, "source_system", "", errs, required=True),
        "external_id": _string(raw, "external_id", "", errs, required=True),
    }
    if "\x00" in (order["source_system"] or ""):  # it ends the events topic (publisher)
        errs.add("source_system", "must not contain the NUL character")
    order_type = given(raw, "order_type", "retail")
    if not isinstance(order_type, str) or order_type not in order_types:
        known = ", ".join(sorted(order_types))
        errs.add("order_type", f"unknown order type {order_type!r:.100}; known: {known}")
    order["order_type"] = order_type
    customer = _map(raw, "customer", errs, required=True)
    order["customer"] = _customer(customer, errs) if customer is not None else None
    address = _map(raw, "customer_address", errs, required=True)
    order["customer_address"] = (
        _address(address, "customer_address", errs) if address is not None else None
    )
    delivery = _map(raw, "delivery_address", errs, required=False)
    order["delivery_address"] = (
        _address(delivery, "delivery_address", errs)
        if delivery is not None
        else order["customer_address"]
    )
    currency = given(raw, "currency", "EUR")
    if not isinstance(currency, str) or not CURRENCY.fullmatch(currency):
        errs.add("currency", "must be 3 upper-case letters (ISO 4217), e.g. EUR")
    order["currency"] = currency
    order["items"] = _items(raw.get("items"), errs)
    order["attributes"] = _attributes(raw, "", errs)
    if errs:
        return None, list(errs)
    return order, []

"""The fast path of intake validation: a plainly valid order, checked in one
pass with exact types (as msgpack decodes them), normalised exactly as the
full walk (``oms.validation.validate_full``) normalises it. Anything else it
declines (None), and the full walk decides and names every error:
``tests/test_validation_fast.py`` holds the two to the same answers.
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


def _text(value: Any) -> bool:
    """A required string as ``oms.validation._string`` accepts it (exact type)."""
    return type(value) is str and len(value) <= MAX_STR and bool(value.strip())


def _optional(raw: dict[str, Any], keys: tuple[str, ...], out: dict[str, Any]) -> bool:
    """Copy the optional string fields present; False if one is not fine."""
    for key in keys:
        value = raw.get(key)
        if value is not None:
            if type(value) is not str or len(value) > MAX_STR:
                return False
            out[key] = value
    return True


def _fast_address(raw: Any) -> dict[str, Any] | None:
    if type(raw) is not dict or not ADDRESS_FIELDS.issuperset(raw):
        return None
    line1, city, postal_code = raw.get("line1"), raw.get("city"), raw.get("postal_code")
    country = raw.get("country")  # two capitals: a fine string too
    if not (_text(line1) and _text(city) and _text(postal_code) and type(country) is str
            and COUNTRY.fullmatch(country)):
        return None
    out = {"line1": line1, "city": city, "postal_code": postal_code, "country": country}
    if ("line2" in raw or "region" in raw) and not _optional(raw, ("line2", "region"), out):
        return None
    return out


def _fast_attributes(raw: dict[str, Any]) -> dict[str, Any] | None:
    value = raw.get("attributes")
    if value is None:
        return {}
    if type(value) is not dict:
        return None
    if value:
        errs: list[FieldError] = []
        check_attributes(value, "attributes", errs)
        if errs:
            return None
    return value


def _fast_item(raw: Any) -> dict[str, Any] | None:
    if type(raw) is not dict or not ITEM_FIELDS.issuperset(raw):
        return None
    item_id, product_id = raw.get("id"), raw.get("product_id")
    action = given(raw, "action", "add")
    if not (_text(item_id) and _text(product_id)) or type(action) is not str or (
            action not in ACTIONS):
        return None
    item = {"id": item_id, "product_id": product_id, "action": action}
    quantity = raw.get("quantity")
    if quantity is None:
        if action in ("add", "modify"):
            return None
        item["quantity"] = 1
    elif type(quantity) is int and 0 < quantity <= MAX_QUANTITY:
        item["quantity"] = quantity
    else:
        return None
    price = raw.get("unit_price_minor")
    if price is not None:
        if type(price) is not int or not 0 <= price <= MAX_AMOUNT_MINOR:
            return None
        item["unit_price_minor"] = price
    service_id = raw.get("service_id")
    if action in ("modify", "delete"):
        if not _text(service_id):
            return None
        item["service_id"] = service_id
    elif service_id is not None:
        if type(service_id) is not str or len(service_id) > MAX_STR:
            return None
        item["service_id"] = service_id
    attributes = _fast_attributes(raw) if "attributes" in raw else {}
    if attributes is None:
        return None
    item["attributes"] = attributes
    return item


def _fast_items(raw: Any) -> list[dict[str, Any]] | None:
    if type(raw) is not list or not 1 <= len(raw) <= MAX_ITEMS:
        return None
    items, seen, total = [], set(), 0
    for entry in raw:
        item = _fast_item(entry)
        if item is None or item["id"] in seen:
            return None
        seen.add(item["id"])
        if item["action"] in ("add", "modify"):
            line = item.get("unit_price_minor", 0) * item["quantity"]
            total += line
            if total > MAX_AMOUNT_MINOR:  # (a line over it takes the total over it)
                return None
        items.append(item)
    return items


def valid_order(raw: Any, order_types: Collection[str]) -> dict[str, Any] | None:
    """The order ``validate_full`` returns for ``raw`` if ``raw`` is plainly
    valid (exact types, as msgpack decodes them), else None: then the full
    walk decides and names the errors. Its result is the same dict, key for
    key and in the same order (``tests/test_validation_fast.py``)."""
    if type(raw) is not dict or not ORDER_FIELDS.issuperset(raw):
        return None
    source: Any = raw.get("source_system")
    external_id = raw.get("external_id")
    if not (_text(source) and _text(external_id)) or "\x00" in source:
        return None
    order_type = given(raw, "order_type", "retail")
    if type(order_type) is not str or order_type not in order_types:
        return None
    customer = raw.get("customer")
    if type(customer) is not dict or not CUSTOMER_FIELDS.issuperset(customer):
        return None
    out_customer = {"id": customer.get("id")}
    if not _text(out_customer["id"]) or (len(customer) > 1 and not _optional(
            customer, ("name", "email", "phone"), out_customer)):
        return None
    address = _fast_address(raw.get("customer_address"))
    delivery = raw.get("delivery_address")
    delivery = address if delivery is None else _fast_address(delivery)
    currency = given(raw, "currency", "EUR")
    if address is None or delivery is None or type(currency) is not str or (
            not CURRENCY.fullmatch(currency)):
        return None
    items = _fast_items(raw.get("items"))
    attributes = _fast_attributes(raw) if "attributes" in raw else {}
    if items is None or attributes is None:
        return None
    return {"source_system": source, "external_id": external_id, "order_type": order_type,
            "customer": out_customer, "customer_address": address,
            "delivery_address": delivery, "currency": currency, "items": items,
            "attributes": attributes}

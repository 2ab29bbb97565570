"""The rules of an order (contract §1, "The order"): its limits, its fields
and their formats, and the check of its free-form ``attributes`` maps;
shared by intake validation's full walk (``oms.validation``) and its fast
path (``oms.validation_fast``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from oms import codec
from oms.edge import INT64
from oms.errors import FieldError

MAX_STR = 1000
MAX_ITEMS = 1000
MAX_ATTR_DEPTH = 8
MAX_ATTR_BYTES = 12 * 1024
"""Largest ``attributes`` map, encoded (``oms.codec``). A reply carries it
back (provisioning's ``previous_attributes``; a deactivate's ``attributes``
beside a ``product_id`` of up to ``MAX_STR`` characters) in a ``data`` of at
most 16 KiB (``oms.untrusted.MAX_DATA_BYTES``): 4 KiB is left for the rest."""
MAX_QUANTITY = 1_000_000_000
MAX_AMOUNT_MINOR = 2**63 - 1
"""Every amount (a unit price, a line total ``unit_price_minor * quantity``,
the order total) fits in a signed 64-bit integer: every language's clients
and the msgpack encoder can carry it, and totals never overflow."""
ACTIONS = ("add", "modify", "delete", "noChange")

ORDER_FIELDS = {
    "source_system", "external_id", "order_type", "customer", "customer_address",
    "delivery_address", "currency", "items", "attributes",
}
CUSTOMER_FIELDS = {"id", "name", "email", "phone"}
ADDRESS_FIELDS = {"line1", "line2", "city", "postal_code", "region", "country"}
ITEM_FIELDS = {
    "id", "action", "product_id", "quantity", "unit_price_minor", "service_id", "attributes",
}
CURRENCY = re.compile(r"[A-Z]{3}")
COUNTRY = re.compile(r"[A-Z]{2}")


def given(raw: dict[str, Any], key: str, default: Any) -> Any:
    """``raw[key]``, or ``default`` when it is left out or nil (contract
    "Encoding": an optional field sent as nil is the same as one left out)."""
    value = raw.get(key)
    return default if value is None else value


def check_attributes(value: dict[str, Any], field: str, errs: list[FieldError]) -> None:
    """Check a free-form ``attributes`` map: ``check_free_map``, then its
    encoded size (``MAX_ATTR_BYTES``)."""
    before = len(errs)
    check_free_map(value, field, errs)
    if len(errs) == before and len(codec.pack(value)) > MAX_ATTR_BYTES:
        errs.append(FieldError(field, f"at most {MAX_ATTR_BYTES} bytes once encoded"))


def check_free_map(value: Any, field: str, errs: list[FieldError], depth: int = 1) -> None:
    """Check a free-form ``attributes`` map: depth, string lengths, and only
    what a domain system's ``data`` may hold (contract §3: no binary, numbers
    finite and within signed 64 bits, as ``oms.edge``). Attributes go out in commands
    and may come back in replies, which are refused (``invalid_reply``) for
    anything else: one order's odd value must not fail later orders. A reply
    carries them one level down in its ``data`` (8 levels of maps and lists):
    a value may be at level ``MAX_ATTR_DEPTH``, a map or list (even empty)
    only above it."""
    if depth > MAX_ATTR_DEPTH or (depth == MAX_ATTR_DEPTH and isinstance(value, dict | list)):
        errs.append(FieldError(field, f"nested deeper than {MAX_ATTR_DEPTH} levels"))
        return
    if isinstance(value, dict):
        for key, sub in value.items():
            if not isinstance(key, str):  # msgpack allows any key; views are JSON
                errs.append(FieldError(field, "keys must be strings"))
            elif len(key) > MAX_STR:
                errs.append(FieldError(field, f"key longer than {MAX_STR} characters"))
            else:
                check_free_map(sub, f"{field}.{key}", errs, depth + 1)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            check_free_map(sub, f"{field}[{i}]", errs, depth + 1)
    elif isinstance(value, str):
        if len(value) > MAX_STR:
            errs.append(FieldError(field, f"at most {MAX_STR} characters"))
    elif isinstance(value, bytes):
        errs.append(FieldError(field, "binary values are not allowed"))
    elif isinstance(value, float) and not math.isfinite(value):
        errs.append(FieldError(field, "must be a finite number"))
    elif isinstance(value, int | float) and not INT64[0] <= value <= INT64[1]:
        errs.append(FieldError(field, "numbers must be within signed 64 bits"))

"""Argument templates of process definitions.

A string value ``"$scope.path.to.field"`` is replaced by the value found
there; anything else is taken literally, recursively through maps and lists.
Scopes: ``order`` (the order's facts below), ``steps.NAME`` (an earlier
step's result), ``item`` (the item of a per-item step), ``result`` and
``args`` (a step's own result and arguments, in its compensation).
"""

from __future__ import annotations

from typing import Any

from oms.model import Order, charges


def _item_view(it: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": it["id"], "action": it["action"], "product_id": it["product_id"],
        "quantity": it.get("quantity", 1),
    }
    for key in ("unit_price_minor", "service_id"):
        if key in it:
            out[key] = it[key]
    if it.get("attributes"):
        out["attributes"] = it["attributes"]
    return out


def order_facts(order: Order) -> dict[str, Any]:
    """Everything ``$order.…`` may name."""
    charged = [it for it in order.items if it["action"] in ("add", "modify")]
    completed = [it for it in charged if it.get("state") == "completed"]
    return {
        "id": order.order_id,
        "external_id": order.external_id,
        "source_system": order.source_system,
        "order_type": order.order_type,
        "customer": order.customer,
        "customer_address": order.customer_address,
        "delivery_address": order.delivery_address,
        "currency": order.currency,
        "attributes": order.attributes,
        "total_minor": order.total_minor,
        "items": [_item_view(it) for it in order.items],
        "stock_items": [
            {"product_id": it["product_id"], "quantity": it.get("quantity", 1)} for it in charged
        ],
        "completed_items": [_item_view(it) for it in completed],
        "completed_total_minor": charges(completed),
    }


def lookup(scopes: dict[str, Any], ref: str) -> Any:
    """The value at dotted path ``ref``, or None where the path ends early."""
    value: Any = scopes
    for part in ref.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def resolve(template: Any, scopes: dict[str, Any]) -> Any:
    """Fill a template's ``$`` references from ``scopes``."""
    if isinstance(template, str) and template.startswith("$"):
        return lookup(scopes, template[1:])
    if isinstance(template, dict):
        return {k: resolve(v, scopes) for k, v in template.items()}
    if isinstance(template, list):
        return [resolve(v, scopes) for v in template]
    return template


def template_roots(template: Any) -> frozenset[str]:
    """The scopes a template names (``order``, ``steps``, ...): the engine
    builds only those."""
    if isinstance(template, str):
        return frozenset({template[1:].split(".", 1)[0]}) if template.startswith("$") \
            else frozenset()
    if isinstance(template, dict):
        values: Any = template.values()
    elif isinstance(template, list):
        values = template
    else:
        return frozenset()
    out: frozenset[str] = frozenset()
    for value in values:
        out |= template_roots(value)
    return out

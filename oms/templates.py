"""Argument templates of process definitions.

A string value ``"$scope.path.to.field"`` is replaced by the value found
there; anything else is taken literally, recursively through maps and lists.
Scopes: ``order`` (the order's facts below), ``steps.NAME`` (an earlier
step's result), ``item`` (the item of a per-item step), ``result`` and
``args`` (a step's own result and arguments, in its compensation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from oms.model import Order, charges


def _item_view(it: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": it["id"], "action": it["action"], "product_id": it["product_id"],
        "quantity": it.get("quantity", 1),
    }
    if "unit_price_minor" in it:  # (written out: a loop over the two keys costs more)
        out["unit_price_minor"] = it["unit_price_minor"]
    if "service_id" in it:
        out["service_id"] = it["service_id"]
    if it.get("attributes"):
        out["attributes"] = it["attributes"]
    return out


def _charged(order: Order) -> list[dict[str, Any]]:
    return [it for it in order.items if it["action"] in ("add", "modify")]


def _completed(order: Order) -> list[dict[str, Any]]:
    return [it for it in _charged(order) if it.get("state") == "completed"]


FACTS: dict[str, Callable[[Order], Any]] = {
    "id": lambda o: o.order_id,
    "external_id": lambda o: o.external_id,
    "source_system": lambda o: o.source_system,
    "order_type": lambda o: o.order_type,
    "customer": lambda o: o.customer,
    "customer_address": lambda o: o.customer_address,
    "delivery_address": lambda o: o.delivery_address,
    "currency": lambda o: o.currency,
    "attributes": lambda o: o.attributes,
    "total_minor": lambda o: o.total_minor,
    "items": lambda o: [_item_view(it) for it in o.items],
    "stock_items": lambda o: [{"product_id": it["product_id"], "quantity": it.get("quantity", 1)}
                              for it in _charged(o)],
    "completed_items": lambda o: [_item_view(it) for it in _completed(o)],
    "completed_total_minor": lambda o: charges(_completed(o)),
}
"""Everything ``$order.…`` may name, each built on demand."""


CHANGING = frozenset({"completed_items", "completed_total_minor"})
"""Facts that change as items complete; the others never change for an order."""


def order_facts(order: Order, names: Iterable[str] | None = None,
                cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """The order's facts (``FACTS``): all, or only ``names`` (what a template
    names: the engine builds no more than that). ``cache`` keeps the facts
    that never change (all but ``CHANGING``) between calls for one order."""
    if names is None:
        return {name: fact(order) for name, fact in FACTS.items()}
    if cache is None:
        return {name: FACTS[name](order) for name in names if name in FACTS}
    out: dict[str, Any] = {}
    for name in names:
        value = cache.get(name, _MISSING)
        if value is _MISSING:
            fact = FACTS.get(name)
            if fact is None:
                continue
            value = fact(order)
            if name not in CHANGING:
                cache[name] = value
        out[name] = value
    return out


_MISSING = object()


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


def template_refs(template: Any) -> frozenset[tuple[str, str | None]]:
    """The (scope, first name under it) pairs a template names, e.g.
    ``("order", "total_minor")``; ``("order", None)`` for the whole scope."""
    if isinstance(template, str):
        if not template.startswith("$"):
            return frozenset()
        parts = template[1:].split(".", 2)
        return frozenset({(parts[0], parts[1] if len(parts) > 1 else None)})
    if isinstance(template, dict):
        values: Any = template.values()
    elif isinstance(template, list):
        values = template
    else:
        return frozenset()
    out: frozenset[tuple[str, str | None]] = frozenset()
    for value in values:
        out |= template_refs(value)
    return out


class Template:
    """A parsed argument template: the scopes it names, which of the order's
    facts and which steps' results (None: all of them), and ``fill``, which
    fills it from scopes as ``resolve`` does, without walking the template
    again. A template reads no scope it does not name, so only those need
    building (``oms.engine_base.TurnBase.fill``)."""

    __slots__ = ("facts", "fill", "fixed", "names_order", "names_own", "names_steps", "raw",
                 "scopes", "steps")

    def __init__(self, raw: Any) -> None:
        refs = template_refs(raw)
        self.raw = raw  # kept: its id() is the engine's cache key
        self.scopes = frozenset(scope for scope, _ in refs)
        self.names_order = "order" in self.scopes  # (what ``scopes`` says, read once)
        self.names_steps = "steps" in self.scopes
        self.names_own = not self.scopes.isdisjoint(("item", "result", "args"))  # a step's own
        self.facts = _named(refs, "order")
        self.fixed = self.facts is not None and self.facts.isdisjoint(CHANGING)
        self.steps = _named(refs, "steps")
        self.fill = compile_template(raw)

    def order_scope(self, order: Order, cache: dict[str, Any]) -> dict[str, Any]:
        """Its ``order`` scope: the order's kept facts themselves (``cache``, as
        ``order_facts`` keeps them) when it names only facts that never change,
        as it reads nothing else of the scope; else ``order_facts``."""
        if not self.fixed:
            return order_facts(order, self.facts, cache)
        facts = self.facts or frozenset()
        if cache.keys() >= facts:  # all kept already (the usual case): one C-level check
            return cache
        for name in facts:
            if name not in cache:
                fact = FACTS.get(name)
                if fact is not None:
                    cache[name] = fact(order)
        return cache


def _named(refs: frozenset[tuple[str, str | None]], scope: str) -> frozenset[str] | None:
    """The names a template reads under ``scope`` (None: the whole scope)."""
    names = {name for s, name in refs if s == scope}
    return None if None in names else frozenset(n for n in names if n is not None)


def compile_template(template: Any) -> Callable[[dict[str, Any]], Any]:
    """``resolve(template, scopes)`` as a function of ``scopes``."""
    if isinstance(template, str) and template.startswith("$"):
        parts = tuple(template[1:].split("."))
        if len(parts) == 2:
            first, second = parts

            def ref2(scopes: dict[str, Any]) -> Any:
                value = scopes.get(first)
                return value.get(second) if isinstance(value, dict) else None

            return ref2

        def ref(scopes: dict[str, Any]) -> Any:
            value: Any = scopes
            for part in parts:
                if isinstance(value, dict):
                    value = value.get(part)
                else:
                    return None
            return value

        return ref
    if isinstance(template, dict):
        return _compile_map(template)
    if isinstance(template, list):
        fills = [compile_template(value) for value in template]
        return lambda scopes: [fill(scopes) for fill in fills]
    return lambda _scopes: template


def _compile_map(template: dict[str, Any]) -> Callable[[dict[str, Any]], Any]:
    """A map template as one generated function (as ``collections.namedtuple``
    makes its ``__new__``): each reference (the usual value) is followed in
    straight-line code, each scope read once, the map built by one literal;
    the rest filled by their own functions. Every key, name and function it
    uses is a name bound in its namespace, never text of the template. It
    gives what ``resolve`` gives, keys in the same order (``tests/test_engine.py``:
    ``test_a_parsed_template_fills_exactly_as_resolve_does``)."""
    namespace: dict[str, Any] = {"_isinstance": isinstance, "_dict": dict}
    lines = ["def fill_map(scopes):"]
    scope_vars: dict[str, str] = {}
    for i, (key, value) in enumerate(template.items()):
        namespace[f"k{i}"] = key
        if isinstance(value, str) and value.startswith("$"):
            first, *rest = value[1:].split(".")
            var = scope_vars.get(first)
            if var is None:  # a scope is read once (``scopes`` does not change meanwhile),
                var = scope_vars[first] = f"s{len(scope_vars)}"  # and whether it is a map
                namespace[f"n{var}"] = first  # is asked once: d{var}, None if it is not
                lines.append(f"    {var} = scopes.get(n{var})")
                lines.append(f"    d{var} = {var} if _isinstance({var}, _dict) else None")
            if not rest:
                lines.append(f"    v{i} = {var}")
            for j, part in enumerate(rest):  # as ``ref``: None once the path leaves the maps
                namespace[f"p{i}_{j}"] = part
                lines.append(f"    v{i} = d{var}.get(p{i}_{j}) if d{var} is not None else None"
                             if j == 0 else
                             f"    v{i} = v{i}.get(p{i}_{j}) if _isinstance(v{i}, _dict) else None")
        else:
            namespace[f"f{i}"] = compile_template(value)
            lines.append(f"    v{i} = f{i}(scopes)")
    lines.append("    return {" + ", ".join(f"k{i}: v{i}" for i in range(len(template))) + "}")
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from names only, as above
    fill_map: Callable[[dict[str, Any]], Any] = namespace["fill_map"]
    return fill_map

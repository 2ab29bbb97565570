"""What the console's pages show, as plain data: the overview, an order's
page (its fallout and the actions an operator may take), the server-sent
events stream, and the template filters. ``console.app`` renders them."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from typing import Any

from console.backend import Backend, EventFeed
from oms.states import TERMINAL

ACTIONS = {
    "retry": "Run the failed step again (as a new command to its system).",
    "skip": "Mark the failed step done without running it, and go on.",
    "abort": "Undo the completed steps (compensation), then the order is failed.",
    "cancel": "Cancel the order: undo the completed steps, then it is cancelled "
              "(refused after the point of no return).",
}
_DEFAULT_HINT = ("Fix the cause with the domain system, then retry the step; skip it if it "
                 "was done by hand; or abort or cancel the order to undo what was done.")


def overview_context(backend: Backend, feed: EventFeed | None) -> dict[str, Any]:
    counts = backend.counts()
    fallout: list[dict[str, Any]] = []
    for reason in ("fallout", "internal_error"):
        rows, _ = backend.search({"state": "held", "state_reason": reason}, size=50)
        fallout += rows
    jeopardy = feed.in_jeopardy() if feed is not None else []
    return {"counts": counts, "fallout": fallout, "jeopardy": jeopardy,
            "live": feed is not None, "now": time.time()}


def actions_for(view: dict[str, Any]) -> list[str]:
    """What an operator can do with this order now (the service has the last word)."""
    fallout = view.get("fallout")
    if isinstance(fallout, dict) and isinstance(fallout.get("actions"), list):
        return [a for a in fallout["actions"] if a in ACTIONS]
    state, reason = view.get("state"), view.get("state_reason")
    if state in TERMINAL:
        return []
    if state == "held" and reason in ("fallout", "internal_error"):
        return ["retry", "skip", "abort", "cancel"]
    if reason == "compensating" or state in ("assessingCancellation", "pendingCancellation"):
        return []
    return ["abort", "cancel"]


def order_context(view: dict[str, Any]) -> dict[str, Any]:
    fallout = view.get("fallout") if isinstance(view.get("fallout"), dict) else None
    failure = view.get("failure") if isinstance(view.get("failure"), dict) else None
    failed_step = (fallout or {}).get("step") or (failure or {}).get("step")
    if fallout is None and failure is not None and view.get("state") == "held":
        error = failure.get("error") if isinstance(failure.get("error"), dict) else None
        fallout = {"step": failure.get("step"), "item": None,
                   "compensation": bool(failure.get("compensation")), "error": error,
                   "reason": view.get("state_reason"), "hint": _DEFAULT_HINT}
    actions = actions_for(view)

    def maps(key: str) -> list[dict[str, Any]]:  # a view from any service version renders
        value = view.get(key)
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

    summary = view.get("summary") if isinstance(view.get("summary"), dict) else None
    if fallout is not None and not isinstance(fallout.get("error"), dict):
        fallout = dict(fallout, error=None)
    return {"o": view, "fallout": fallout, "failure": failure, "failed_step": failed_step,
            "items": maps("items"), "steps": maps("steps"), "history": maps("history"),
            "summary": summary,
            "actions": [(a, ACTIONS[a]) for a in actions],
            "terminal": view.get("state") in TERMINAL}


def event_stream(q: queue.Queue[dict[str, Any]], stream_s: float) -> Iterator[str]:
    """Server-sent events: at most one "changes" message per half second, naming
    the orders that changed; a comment every 5 s keeps the connection open."""
    yield "retry: 2000\n\n"
    yield "event: hello\ndata: {}\n\n"
    end = time.monotonic() + stream_s
    while time.monotonic() < end:
        try:
            first = q.get(timeout=5)
        except queue.Empty:
            yield ": still here\n\n"  # a closed page is noticed (and its thread freed) here
            continue
        time.sleep(0.5)  # coalesce a burst of events into one message
        batch = [first]
        while len(batch) < 1000:
            try:
                batch.append(q.get_nowait())
            except queue.Empty:
                break
        ids = sorted({str(e.get("order_id")) for e in batch if e.get("order_id")})
        data = {"order_ids": ids[:100], "many": len(ids) > 100,
                "types": sorted({str(e.get("type")) for e in batch})}
        yield f"event: changes\ndata: {json.dumps(data)}\n\n"


def when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def compact(value: Any) -> str:
    if value is None or value == {}:
        return ""
    try:
        text = json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= 400 else text[:400] + " ..."


# ISO 4217 minor-unit exponents that are not 2 (the others, and unknown codes, use 2).
ZERO_DECIMALS = frozenset({"BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG",
                           "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"})
THREE_DECIMALS = frozenset({"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"})


def money(minor: Any, currency: Any) -> str:
    """An amount in minor units as the currency writes it: ``123456 JPY`` is
    ``123,456 JPY``, ``123456 EUR`` is ``1,234.56 EUR``, ``123456 KWD`` is
    ``123.456 KWD``. Integer arithmetic: exact for any 64-bit amount."""
    if not isinstance(minor, int) or isinstance(minor, bool):
        return ""
    code = currency.upper() if isinstance(currency, str) else ""
    places = 0 if code in ZERO_DECIMALS else 3 if code in THREE_DECIMALS else 2
    whole, part = divmod(abs(minor), 10 ** places)
    text = f"{'-' if minor < 0 else ''}{whole:,}" + (f".{part:0{places}d}" if places else "")
    return f"{text} {currency if isinstance(currency, str) else ''}".strip()

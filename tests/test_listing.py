"""list_orders: newest first, paged with a cursor, bounded work per call, and
never in the way of intake (defect 14: ten large listings held back another
client's submit_order by 20.7 s). Real LMDB, real sockets."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import retail_order
from test_recovery import Builder, waiting_for_delivery

from actors.settings import load_processes
from gateways.client import Client
from storage.listing import ListFilter
from storage.store import Store


def build(data: Path, count: int) -> list[str]:
    """``count`` stored orders (ids in acceptance order); every 100th is
    customer ``vip``, every 7th from source ``shop``."""
    builder = Builder(data)
    order = waiting_for_delivery(load_processes()["retail"])
    ids = []
    for n in range(count):
        cust = dict(order.customer, id="vip" if n % 100 == 0 else f"c-{n}")
        ids.append(builder.add(order, external_id=f"L-{n}", customer=cust,
                               source_system="shop" if n % 7 == 0 else "web"))
    builder.close()
    return ids


def pages(list_page: Any, **flt: Any) -> tuple[list[str], int]:
    """Every order id over all pages, and how many pages it took."""
    seen: list[str] = []
    cursor, calls = None, 0
    while True:
        orders, cursor = list_page(cursor, **flt)
        calls += 1
        seen += orders
        if cursor is None:
            return seen, calls


def test_store_pages_newest_first_within_a_budget(tmp_path: Path) -> None:
    ids = build(tmp_path / "data", 2000)
    store = Store(tmp_path / "data")
    try:
        def page(after: str | None, limit: int = 30, budget: int = 250,
                 **flt: Any) -> tuple[list[str], str | None]:
            orders, cursor = store.list_orders(ListFilter(**flt), limit, after, budget=budget,
                                               chunk=64)
            return [o.order_id for o in orders], cursor

        everything, calls = pages(page)
        assert everything == ids[::-1] and calls == -(-2000 // 30)
        vip, calls = pages(page, customer_id="vip")  # 20 matches spread thin
        assert vip == [i for n, i in enumerate(ids) if n % 100 == 0][::-1]
        assert calls == 8  # 2000 records / 250 examined per call: pages without matches
        shop, _ = pages(page, source_system="shop", customer_id="vip")
        assert shop == [i for n, i in enumerate(ids) if n % 700 == 0][::-1]
        # the limit reached on the very oldest order: no cursor
        assert page(ids[30], limit=30) == (ids[:30][::-1], None)
        assert page(ids[0]) == ([], None)  # nothing is older than the oldest
        assert page("O999999999999")[0][0] == ids[-1]  # a cursor beyond all: the newest
        assert page(None, source_system="web", external_id="L-5") == ([ids[5]], None)
        assert page(ids[5], source_system="web", external_id="L-5") == ([], None)
        assert page(None, source_system="web", external_id="nope") == ([], None)
        assert page(None, state="completed") == ([], ids[-250])  # budget spent, go on
    finally:
        store.close()


def test_paging_misses_and_repeats_nothing_while_orders_arrive(
        make_service: Any, sim: Any, eps: Any) -> None:
    make_service()
    with Client(eps.intake, timeout=10) as client:
        first = [client.submit(retail_order(f"P-{n}"))["order_id"] for n in range(120)]
        stop = threading.Event()
        arrived: list[str] = []

        def submit_more() -> None:
            with Client(eps.intake, timeout=10) as other:
                n = 0
                while not stop.is_set():
                    arrived.append(other.submit(retail_order(f"Q-{n}"))["order_id"])
                    n += 1

        feeder = threading.Thread(target=submit_more, daemon=True)
        feeder.start()
        try:
            seen, cursor = [], None
            while True:
                req: dict[str, Any] = {"type": "list_orders", "limit": 7}
                if cursor:
                    req["after"] = cursor
                page = client.request(req)
                assert page["type"] == "orders"
                seen += [o["order_id"] for o in page["orders"]]
                cursor = page["next"]
                if cursor is None:
                    break
        finally:
            stop.set()
            feeder.join(10)
    assert len(seen) == len(set(seen))  # nothing twice
    assert seen == sorted(seen, reverse=True)  # newest first
    assert set(first) <= set(seen)  # nothing that existed before is missed


def test_large_listings_never_hold_back_a_submit(make_service: Any, sim: Any, eps: Any,
                                                 tmp_path: Path) -> None:
    build(tmp_path / "data", 8000)
    make_service()
    finished: list[float] = []
    errors: list[Any] = []
    first_pages = threading.Semaphore(0)

    def list_all() -> None:  # pages through everything with a filter nothing matches
        with Client(eps.intake, timeout=60) as lister:
            cursor = None
            while True:
                req: dict[str, Any] = {"type": "list_orders", "limit": 1000,
                                       "customer_id": "nobody"}
                if cursor:
                    req["after"] = cursor
                page = lister.request(req)
                if page["type"] != "orders":
                    errors.append(page)
                    return
                if cursor is None:
                    first_pages.release()
                cursor = page["next"]
                if cursor is None:
                    finished.append(time.monotonic())
                    return

    listers = [threading.Thread(target=list_all, daemon=True) for _ in range(10)]
    with Client(eps.intake, timeout=30) as client:
        client.request({"type": "order_counts"})  # connected before the listings start
        for t in listers:
            t.start()
        for _ in listers:  # every listing is under way (8,000 orders: 2 pages each)
            assert first_pages.acquire(timeout=30)
        reply = client.submit(retail_order("during-listing"))
        submitted = time.monotonic()
    for t in listers:
        t.join(60)
    assert reply["type"] == "accepted"
    assert not errors or all(e.get("code") == "busy" for e in errors)
    assert finished and submitted < max(finished)  # answered while listings still ran


@pytest.mark.parametrize("req, word", [
    ({"after": 5}, "cursor"), ({"after": "x" * 100}, "cursor"), ({"after": "garbage"}, "cursor"),
    ({"after": "O1"}, "cursor"), ({"customer_id": 3}, "customer_id"),
    ({"external_id": ["a"]}, "external_id"), ({"min_age_s": float("nan")}, "min_age_s"),
    ({"min_age_s": -1}, "min_age_s"), ({"limit": 0}, "limit"), ({"state": "lost"}, "state"),
])
def test_bad_list_requests_get_a_clear_error(service: Any, client: Client,
                                             req: dict[str, Any], word: str) -> None:
    reply = client.request({"type": "list_orders", **req})
    assert reply["type"] == "error" and reply["code"] == "malformed"
    assert word in reply["message"]


def test_a_flood_of_listings_is_answered_every_one(make_service: Any, sim: Any, eps: Any,
                                                   tmp_path: Path) -> None:
    """60 listings sent at once: each gets a page or a clear busy (at most 16
    wait for the lister), never silence, and intake still takes orders."""
    build(tmp_path / "data", 6000)
    make_service()
    with Client(eps.intake, timeout=60) as client:
        replies = [r for _q, r in client.pipeline(
            {"type": "list_orders", "customer_id": "nobody", "limit": 10} for _ in range(60))]
        assert len(replies) == 60
        kinds = {(r["type"], r.get("code")) for r in replies}
        assert kinds <= {("orders", None), ("error", "busy")} and ("orders", None) in kinds
        busy = [r for r in replies if r["type"] == "error"]
        assert not busy or "retry later" in busy[0]["message"]
        assert client.submit(retail_order("after-flood"))["type"] == "accepted"

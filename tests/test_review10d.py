"""Hostile review 10 (d): the operators' web console behind the sharded
front. Real processes (simulators, `oms serve --shards 2`, `oms console`),
loopback only, bounded."""

from __future__ import annotations

import html
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import retail_order
from test_console import start_console
from test_shards import Sharded

pytestmark = pytest.mark.slow


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=15) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_console_pages_through_every_order_of_a_sharded_service(
        procs: Any, tmp_path: Path) -> None:
    """Before: the console's search took the last row's order id as the
    cursor of its "Older orders" link when a page filled; the front reads
    only its own opaque cursors (`S1.` ...) and answered `malformed`, so
    page 2 was an error page and no operator could see past the newest 50
    orders of a sharded service. (And `after` was capped at 200
    characters, shorter than a front's cursor can be.)"""
    pytest.importorskip("flask")
    s = Sharded(procs, tmp_path)
    with s.client(timeout=30) as client:
        ids = {r["order_id"] for _q, r in client.pipeline(
            {"type": "submit_order", "order": retail_order(f"pg-{n}", customer={"id": f"c{n}"})}
            for n in range(130))}
    assert len(ids) == 130
    console, url = start_console(tmp_path, s.eps)  # not one of procs: stopped here
    try:
        seen: list[str] = []
        page, pages = "/search?go=1", 0
        while page and pages < 10:
            status, body = _get(url + page)
            assert status == 200, re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))[:400]
            seen += list(dict.fromkeys(re.findall(r"/orders/(O\d{12})", body)))
            nxt = re.search(r'id="next-page" href="([^"]+)"', body)
            page, pages = html.unescape(nxt.group(1)) if nxt else "", pages + 1
        assert len(seen) == len(set(seen)), "an order was shown twice"
        assert set(seen) == ids, f"{len(ids - set(seen))} orders never shown"
    finally:
        assert console.stop(10) == 0, console.tail()

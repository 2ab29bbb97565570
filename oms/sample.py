"""Sample orders for the demo, ``oms submit --sample`` and the bench."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

PRODUCTS = [(f"SKU-{i:03d}", 499 + 250 * i) for i in range(1, 21)]
SCARCE = [f"SKU-9{i:02d}" for i in range(1, 4)]  # low stock in the demo: back-orders
CITIES = [("Berlin", "10115", "DE"), ("Paris", "75001", "FR"), ("Madrid", "28001", "ES"),
          ("Vienna", "1010", "AT"), ("Amsterdam", "1011", "NL")]


def address(rng: random.Random) -> dict[str, Any]:
    city, postal, country = rng.choice(CITIES)
    return {"line1": f"{rng.randint(1, 200)} Sample Street", "city": city,
            "postal_code": postal, "country": country}


def retail(n: int, rng: random.Random, source: str, prefix: str,
           scarce_ratio: float = 0.0) -> dict[str, Any]:
    items = []
    for i in range(rng.randint(1, 3)):
        sku, price = rng.choice(PRODUCTS)
        if rng.random() < scarce_ratio:
            sku = rng.choice(SCARCE)
        items.append({"id": f"line-{i + 1}", "product_id": sku,
                      "quantity": rng.randint(1, 3), "unit_price_minor": price})
    return {"source_system": source, "external_id": f"{prefix}{n:07d}", "order_type": "retail",
            "customer": {"id": f"cust-{rng.randint(1, 10**6)}", "name": "Sample Customer"},
            "customer_address": address(rng), "currency": "EUR", "items": items}


def telecom(n: int, rng: random.Random, source: str, prefix: str) -> dict[str, Any]:
    items = [{"id": "fiber", "product_id": "FIBER-1000", "quantity": 1,
              "unit_price_minor": 3999, "attributes": {"speed_mbps": 1000}}]
    if rng.random() < 0.5:
        items.append({"id": "tv", "action": "modify", "product_id": "TV-PLUS", "quantity": 1,
                      "service_id": f"svc-existing-{n}", "attributes": {"channels": 120}})
    if rng.random() < 0.3:
        items.append({"id": "dsl", "action": "delete", "product_id": "DSL-50",
                      "service_id": rng.choice([f"svc-existing-d{n}", f"svc-gone-{n}"])})
    return {"source_system": source, "external_id": f"{prefix}{n:07d}", "order_type": "telecom",
            "customer": {"id": f"sub-{rng.randint(1, 50)}"}, "customer_address": address(rng),
            "items": items}


def sample_orders(count: int, seed: int = 1, source: str = "demo-shop", prefix: str = "S",
                  telecom_ratio: float = 0.0, scarce_ratio: float = 0.0
                  ) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for n in range(count):
        if rng.random() < telecom_ratio:
            yield telecom(n, rng, source, prefix)
        else:
            yield retail(n, rng, source, prefix, scarce_ratio)

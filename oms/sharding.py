"""Virtual shards: which one an order belongs to, and what its id says.

Pure functions, shared by the shard processes (which give out ids) and the
front (which routes by them). ``docs/scaling.md`` explains the design.

- The virtual shard of an order is ``blake2b(customer.id) mod V``: all of a
  customer's orders share one, so one process sequences them.
- A sharded order id is ``O`` + the owning process's 10-digit counter + the
  2-digit virtual shard: still ``O`` and 12 digits, and the owner can be read
  from it.
"""

from __future__ import annotations

import hashlib

MAX_VSHARDS = 100  # two digits in the order id
DEFAULT_VSHARDS = 64
MAX_SEQ = 10**10 - 1


def vshard_of(customer_id: str, vshards: int) -> int:
    """The virtual shard of a customer (stable across processes and releases)."""
    digest = hashlib.blake2b(customer_id.encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") % vshards


def sharded_order_id(seq: int, vshard: int) -> str:
    if not 0 < seq <= MAX_SEQ:
        raise ValueError(f"order counter {seq} does not fit ten digits")
    if not 0 <= vshard < MAX_VSHARDS:
        raise ValueError(f"virtual shard {vshard} is not 0..{MAX_VSHARDS - 1}")
    return f"O{seq:010d}{vshard:02d}"


def vshard_of_order_id(order_id: object, vshards: int) -> int | None:
    """The virtual shard an id names, or None when it is not one of ours."""
    if not (isinstance(order_id, str) and len(order_id) == 13 and order_id[0] == "O"
            and order_id[1:].isascii() and order_id[1:].isdigit()):
        return None
    vshard = int(order_id[-2:])
    return vshard if vshard < vshards else None


def seq_of_order_id(order_id: str) -> int:
    return int(order_id[1:11])

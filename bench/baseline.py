"""The baseline: the retail lifecycle as one hand-written loop, no actors.

It does the same I/O as the service for each order: the same commands to the
same simulators over ZeroMQ (CRM notified of inProgress and completed,
reserve, invoice, capture, ship), the shipment_delivered event received and
acknowledged on a ROUTER, and a synced LMDB write of the order at every
step, committed in groups before the commands that depend on them are sent.
What it leaves out is everything that makes a service: validation, the
intake socket, process definitions, actors, passivation, events to channels,
metrics. The service's throughput divided by this one's says how much the
service costs on top of its I/O, on any machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lmdb
import zmq

from bench.load import Progress
from oms import codec

FLOW = [("warehouse", "reserve_stock"), ("billing", "create_invoice"),
        ("billing", "capture_payment"), ("shipping", "create_shipment")]


class Baseline:
    def __init__(self, systems: dict[str, str], events_endpoint: str, data: Path) -> None:
        ctx = zmq.Context.instance()
        self.socks: dict[str, zmq.Socket] = {}
        for system in ("warehouse", "billing", "shipping", "crm"):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(systems[system])
            self.socks[system] = sock
        self.events = ctx.socket(zmq.ROUTER)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(events_endpoint)
        data.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(data), map_size=1 << 30, sync=True, metasync=True)
        self.poller = zmq.Poller()
        for sock in [*self.socks.values(), self.events]:
            self.poller.register(sock, zmq.POLLIN)

    def close(self) -> None:
        for sock in [*self.socks.values(), self.events]:
            sock.close()
        self.env.close()

    @staticmethod
    def _delivered(oid: str, st: dict[str, Any], writes: dict[bytes, bytes], send: Any) -> None:
        st["step"] += 1
        writes[oid.encode()] = codec.pack(st)
        send(oid, "crm", "notify", {"state": "completed"}, "n2")

    def run(self, orders: list[dict[str, Any]], window: int, quiet: bool = False) -> float:
        """Drive every order to completion; return orders/s."""
        state: dict[str, dict[str, Any]] = {}
        writes: dict[bytes, bytes] = {}
        outbox: list[tuple[str, dict[str, Any]]] = []
        acks: list[list[bytes]] = []
        feed = iter(orders)
        done = started = 0
        progress = Progress(len(orders), "baseline", quiet)
        t0 = time.monotonic()

        def send(oid: str, system: str, op: str, args: dict[str, Any], tag: str) -> None:
            outbox.append((system, {"type": "command", "command_id": f"{oid}:{tag}",
                                    "order_id": oid, "op": op, "args": args}))

        def advance(oid: str) -> None:
            st = state[oid]
            writes[oid.encode()] = codec.pack(st)
            if st["step"] < len(FLOW):
                system, op = FLOW[st["step"]]
                send(oid, system, op, {"items": st["order"]["items"],
                                       "results": st["results"]}, op)

        while done < len(orders):
            while started - done < window and started < len(orders):
                order = next(feed)
                oid = f"B{started:09d}"
                started += 1
                state[oid] = {"order": order, "step": 0, "results": {}}
                send(oid, "crm", "notify", {"state": "inProgress"}, "n1")
                advance(oid)
            if writes:
                with self.env.begin(write=True) as txn:
                    for key, value in writes.items():
                        txn.put(key, value)
                writes.clear()
            for frames in acks:
                self.events.send_multipart(frames)
            acks.clear()
            for system, cmd in outbox:
                self.socks[system].send(codec.pack(cmd))
            outbox.clear()
            for sock, _ in self.poller.poll(100):
                while True:
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = codec.decode_map(frames[-1])
                    if sock is self.events:
                        acks.append([*frames[:-1], codec.pack(
                            {"type": "ack", "event_id": msg["event_id"]})])
                        st = state.get(msg.get("order_id"))
                        if st is not None and not st.get("delivered"):
                            st["delivered"] = True  # may come before the shipment reply
                            if st["step"] == len(FLOW):
                                self._delivered(msg["order_id"], st, writes, send)
                        continue
                    oid, _, tag = msg["command_id"].partition(":")
                    st = state.get(oid)
                    if st is None:
                        continue
                    if tag == "n2":
                        writes[oid.encode()] = codec.pack(st)
                        del state[oid]
                        done += 1
                    elif tag != "n1":
                        st["results"].update(msg.get("data") or {})
                        st["step"] += 1
                        advance(oid)
                        if st["step"] == len(FLOW) and st.get("delivered"):
                            self._delivered(oid, st, writes, send)
            progress.show(done)
        progress.show(done, force=True)
        progress.close()
        return len(orders) / (time.monotonic() - t0)

"""The baseline: the service's retail workload as one hand-written loop.

It runs as its own process in place of the service, and the same load
generator drives it the same way, so both figures are measured alike. It does
the same I/O as the service for each order:

- the intake: a ROUTER; ``submit_order`` is decoded and acknowledged only
  after the order is durably written (``get_order`` gets a stub answer, for
  the readiness check);
- the same commands to the same simulators (CRM notified of inProgress and
  completed; reserve, invoice, capture, ship), and ``shipment_delivered``
  received and acknowledged after it is durably recorded;
- a synced LMDB write of the order at every step, committed in groups before
  anything that depends on it is sent;
- the same 13 channel events per order on a PUB socket (``order_state``
  twice, ``order_progress`` for each step running and done, ``order_summary``).

What it leaves out is everything that makes a service: validation, process
definitions, actors, passivation, retries, timeouts, metrics, logging. The
service's throughput divided by this one's says what the service costs on
top of its I/O, on any machine.

Run: ``python -m bench.baseline --data D --intake EP --events EP
--domain-events EP --system NAME=EP ...`` (the harness does).
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any

import lmdb
import zmq

from actors.runtime import tune_gc
from actors.sockets import open_socket
from oms import codec

FLOW = [("warehouse", "reserve_stock"), ("billing", "create_invoice"),
        ("billing", "capture_payment"), ("shipping", "create_shipment")]


class Baseline:
    def __init__(self, data: Path, intake: str, events: str, domain_events: str,
                 systems: dict[str, str]) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        unbounded: dict[str, Any] = {"LINGER": 0, "SNDHWM": 0, "RCVHWM": 0}
        self.intake = open_socket(ctx, zmq.ROUTER, bind=intake, **unbounded)
        self.pub = open_socket(ctx, zmq.PUB, bind=events, **unbounded)
        self.events = open_socket(ctx, zmq.ROUTER, bind=domain_events, **unbounded)
        self.socks = {system: open_socket(ctx, zmq.DEALER, connect=systems[system], **unbounded)
                      for system in ("warehouse", "billing", "shipping", "crm")}
        data.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(data), map_size=1 << 32, sync=True, metasync=True)
        self.poller = zmq.Poller()
        for sock in [self.intake, self.events, *self.socks.values()]:
            self.poller.register(sock, zmq.POLLIN)
        self.state: dict[str, dict[str, Any]] = {}
        self.writes: dict[bytes, bytes] = {}
        self.after: list[tuple[zmq.Socket, list[bytes]]] = []  # sent after the commit
        self.serial = 0
        self.stopped = False

    def close(self) -> None:
        for sock in [self.intake, self.pub, self.events, *self.socks.values()]:
            sock.close()
        self.env.close()

    # -- effects, held until the commit -----------------------------------

    def _save(self, oid: str) -> None:
        self.writes[oid.encode()] = codec.pack(self.state[oid])

    def _command(self, oid: str, system: str, op: str, args: dict[str, Any], tag: str) -> None:
        self.after.append((self.socks[system], [codec.pack(
            {"type": "command", "command_id": f"{oid}:{tag}", "order_id": oid, "op": op,
             "args": args})]))

    def _publish(self, oid: str, payload: dict[str, Any]) -> None:
        st = self.state[oid]
        payload.update(order_id=oid, external_id=st["order"]["external_id"], ts=time.time())
        self.after.append((self.pub, [st["order"]["source_system"].encode(),
                                      codec.pack(payload)]))

    def _progress(self, oid: str, step: str, status: str) -> None:
        self._publish(oid, {"type": "order_progress", "step": step, "status": status})

    def _transition(self, oid: str, old: str, new: str) -> None:
        self.state[oid]["state"] = new
        self._publish(oid, {"type": "order_state", "state": new, "previous_state": old})

    # -- the retail flow --------------------------------------------------

    def _submit(self, envelope: list[bytes], req: dict[str, Any]) -> None:
        order = req.get("order")
        if not isinstance(order, dict):
            self.after.append((self.intake, [*envelope, codec.pack(
                {"type": "error", "code": "malformed", "message": "no order"})]))
            return
        self.serial += 1
        oid = f"B{self.serial:010d}"
        self.state[oid] = {"order": order, "state": "acknowledged", "step": 0, "results": {}}
        self.after.append((self.intake, [*envelope, codec.pack(
            {"type": "accepted", "order_id": oid, "state": "acknowledged", "duplicate": False,
             "request_id": req.get("request_id")})]))
        self._transition(oid, "acknowledged", "inProgress")
        self._command(oid, "crm", "notify", {"state": "inProgress"}, "n1")
        self._step(oid)

    def _step(self, oid: str) -> None:
        st = self.state[oid]
        self._save(oid)
        if st["step"] < len(FLOW):
            system, op = FLOW[st["step"]]
            self._progress(oid, op, "running")
            self._command(oid, system, op, {"items": st["order"]["items"],
                                            "results": st["results"]}, op)
        else:
            self._progress(oid, "await_delivery", "running")
            if st.get("delivered"):
                self._delivered(oid)

    def _result(self, oid: str, tag: str, data: dict[str, Any]) -> None:
        st = self.state.get(oid)
        if st is None or tag == "n1":
            return
        if tag == "n2":
            self._save(oid)
            del self.state[oid]
            return
        st["results"].update(data)
        self._progress(oid, FLOW[st["step"]][1], "done")
        st["step"] += 1
        self._step(oid)

    def _event(self, oid: str) -> None:
        st = self.state.get(oid)
        if st is None or st.get("delivered"):
            return
        st["delivered"] = True  # it may come before the shipment reply
        self._save(oid)
        if st["step"] == len(FLOW):
            self._delivered(oid)

    def _delivered(self, oid: str) -> None:
        st = self.state[oid]
        self._progress(oid, "await_delivery", "done")
        self._transition(oid, "inProgress", "completed")
        self._publish(oid, {"type": "order_summary", "summary": {
            "state": "completed", "completed_ts": time.time(), "results": st["results"]}})
        self._command(oid, "crm", "notify", {"state": "completed"}, "n2")
        self._save(oid)

    # -- the loop ----------------------------------------------------------

    def run(self) -> None:
        while not self.stopped:
            ready = dict(self.poller.poll(100))
            if self.intake in ready:
                for frames in self._drain(self.intake):
                    req = codec.decode_map(frames[-1])
                    if req.get("type") == "submit_order":
                        self._submit(frames[:-1], req)
                    else:  # get_order: the harness's readiness check
                        self.after.append((self.intake, [*frames[:-1], codec.pack(
                            {"type": "error", "code": "not_found", "message": "baseline",
                             "request_id": req.get("request_id")})]))
            if self.events in ready:
                for frames in self._drain(self.events):
                    ev = codec.decode_map(frames[-1])
                    self.after.append((self.events, [*frames[:-1], codec.pack(
                        {"type": "ack", "event_id": ev["event_id"]})]))
                    self._event(ev["order_id"])
            for sock in self.socks.values():
                if sock in ready:
                    for frames in self._drain(sock):
                        msg = codec.decode_map(frames[-1])
                        oid, _, tag = msg["command_id"].partition(":")
                        self._result(oid, tag, msg.get("data") or {})
            if self.writes:
                with self.env.begin(write=True) as txn:
                    for key, value in self.writes.items():
                        txn.put(key, value)
                self.writes.clear()
            for sock, frames in self.after:
                sock.send_multipart(frames)
            self.after.clear()

    @staticmethod
    def _drain(sock: zmq.Socket) -> list[list[bytes]]:
        out = []
        for _ in range(4096):
            try:
                out.append(sock.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                break
        return out

    def stop(self, *_: Any) -> None:
        self.stopped = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--intake", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--domain-events", required=True)
    p.add_argument("--system", action="append", default=[], help="NAME=ENDPOINT")
    args = p.parse_args()
    systems = dict(s.split("=", 1) for s in args.system)
    base = Baseline(Path(args.data), args.intake, args.events, args.domain_events, systems)
    tune_gc()  # as the service does
    signal.signal(signal.SIGTERM, base.stop)
    signal.signal(signal.SIGINT, base.stop)
    try:
        base.run()
    finally:
        base.close()


if __name__ == "__main__":
    main()

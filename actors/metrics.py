"""Prometheus metrics of the service, all ``oms_``-prefixed.

One ``Metrics`` object per service, built on a registry passed in (tests use
a fresh one). Labels are bounded sets (system, op, state, outcome, order type,
source system); an order id is never a label. Values that change on every
message (mailbox depth, live actors, orders per state) are read at scrape
time by ``ServiceCollector``. ``docs/metrics.md`` lists them all.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

UNFINISHED = ("acknowledged", "pending", "inProgress", "held", "assessingCancellation",
              "pendingCancellation")
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
           300, 900, 3600)
FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
TURN = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        1, 5)
BATCH = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.orders_received = Counter(
            "oms_orders_received", "submit_order requests by outcome",
            ["source_system", "outcome"], registry=r)
        self.requests = Counter(
            "oms_intake_requests", "Intake requests by type and reply", ["type", "reply"],
            registry=r)
        self.intake_errors = Counter(
            "oms_intake_errors", "Intake error replies by code", ["code"], registry=r)
        self.reply_failures = Counter(
            "oms_reply_send_failures", "Replies that could not be sent (peer gone or full)",
            ["endpoint"], registry=r)
        self.transitions = Counter(
            "oms_order_transitions", "Order state changes", ["order_type", "state"],
            registry=r)
        self.completion = Histogram(
            "oms_order_completion_seconds", "Acceptance to terminal state",
            ["order_type", "state"], buckets=LATENCY, registry=r)
        self.step_latency = Histogram(
            "oms_step_seconds", "Command sent to result received", ["system", "op", "outcome"],
            buckets=LATENCY, registry=r)
        self.gateway_requests = Counter(
            "oms_gateway_requests", "Commands sent to domain systems", ["system"], registry=r)
        self.gateway_timeouts = Counter(
            "oms_gateway_timeouts", "Commands with no reply within their timeout", ["system"],
            registry=r)
        self.gateway_retries = Counter(
            "oms_gateway_retries", "Commands sent again (retries and resends)", ["system"],
            registry=r)
        self.gateway_late = Counter(
            "oms_gateway_late_replies", "Replies for commands no longer awaited "
            "(late or duplicate); ignored", ["system"], registry=r)
        self.gateway_send_failures = Counter(
            "oms_gateway_send_failures", "Commands that could not be queued to the socket",
            ["system"], registry=r)
        self.gateway_invalid_replies = Counter(
            "oms_gateway_invalid_replies", "Domain replies that break the contract (wrong "
            "types, a number out of range, undecodable); the command gets a retryable "
            "invalid_reply error", ["system", "reason"], registry=r)
        self.stale_messages = Counter(
            "oms_order_stale_messages", "Messages an order ignored (late, duplicate, stale "
            "timer)", ["kind"], registry=r)
        self.domain_events = Counter(
            "oms_domain_events", "Domain events received by outcome", ["system", "outcome"],
            registry=r)
        self.commit_latency = Histogram(
            "oms_store_commit_seconds", "Group commit duration (write and sync)",
            buckets=FAST, registry=r)
        self.commit_batch = Histogram(
            "oms_store_commit_batch_size", "Writes per group commit", buckets=BATCH,
            registry=r)
        self.loop_turn = Histogram(
            "oms_loop_turn_seconds", "Busy time of one event-loop turn (sockets read, "
            "timers, actors run, group commit, post-commit effects)", buckets=TURN,
            registry=r)
        self.retention_errors = Counter(
            "oms_retention_errors", "Retention batches that failed (orders stay live; "
            "retried)", registry=r)
        self.retention_batch_seconds = Histogram(
            "oms_retention_batch_seconds", "One retention batch: read, archive, fsync, "
            "commit", buckets=FAST, registry=r)
        self.store_grows = Counter(
            "oms_store_map_grows", "Times the LMDB map was grown", registry=r)
        self.store_commit_errors = Counter(
            "oms_store_commit_errors", "Group commits that failed (disk full, map at its cap, "
            "I/O error); their snapshots are held and retried", registry=r)
        self.store_failing = Gauge(
            "oms_store_write_failing", "1 while store commits fail (the service is not ready)",
            registry=r)
        self.corrupt_records = Counter(
            "oms_store_corrupt_records", "Records that could not be decoded", registry=r)
        self.activations = Counter(
            "oms_order_activations", "Order actors started, by reason", ["reason"],
            registry=r)
        self.passivations = Counter(
            "oms_order_passivations", "Waiting order actors passivated to the store",
            registry=r)
        self.recovery_seconds = Gauge(
            "oms_recovery_duration_seconds", "Time the last start spent recovering",
            registry=r)
        self.recovered_orders = Gauge(
            "oms_recovered_orders", "Orders resumed by the last start", registry=r)
        self.keys_reload_failed = Gauge(
            "oms_client_keys_reload_failed", "1 when the last SIGHUP's client keys folder was "
            "refused (the keys in force are the ones before it); 0 after one that loaded",
            registry=r)
        self.internal_errors = Counter(
            "oms_internal_errors", "Unexpected errors caught while handling one message "
            "(logged with a traceback; the component carried on)", ["component"], registry=r)
        self.order_crashes = Counter(
            "oms_order_internal_errors", "Order handlers that raised: the order was reloaded "
            "from its last durable snapshot and held as internal_error", registry=r)
        self.bad_deadlines = Counter(
            "oms_timer_bad_deadlines", "Timer deadlines refused (not a finite, positive "
            "number); armed 1 s from now instead", registry=r)
        self.published = Counter(
            "oms_events_published", "Channel events published", ["type"], registry=r)
        self.subscribers = Gauge(
            "oms_event_subscribers", "Connections to the events endpoint (at most "
            "max_subscribers)", registry=r)
        self.subscribers_refused = Counter(
            "oms_event_subscribers_refused", "Events connections shut down because "
            "max_subscribers were connected", registry=r)
        for metric in vars(self).values():
            if getattr(metric, "_labelnames", None):
                _cache_children(metric)
        self.source_label = BoundedLabel(SOURCE_LABELS)


SOURCE_LABELS = 100


class BoundedLabel:
    """A label value a client chose (``source_system``), from a bounded set.

    Each new value is a new time series in every scrape, for good. With CURVE
    on, only listed channels get in; without it any client may name any
    source system. So the first ``limit`` distinct values are kept as they
    are and later ones count as ``other``; values that are not short
    printable strings count as ``invalid``: no control character (NUL, a
    line break, an escape sequence) or other unprintable one (a line
    separator, an unassigned code point) reaches the exposition text, where
    the Prometheus format escapes only ``\\``, ``"`` and a newline.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: object) -> str:
        if not isinstance(value, str):  # (a list or a map is not even hashable)
            return "invalid"
        if value in self._seen:  # (checked when first seen)
            return value
        if not 0 < len(value) <= 64 or not value.isprintable():
            return "invalid"
        if len(self._seen) >= self.limit:
            return "other"
        self._seen.add(value)  # two threads may race past the limit by one: harmless
        return value


def _cache_children(metric: Any) -> None:
    """Make ``metric.labels(*values)`` a dict lookup once a child exists.

    prometheus_client's ``labels`` validates and converts its arguments and
    takes a lock on every call, and the service calls it for every message.
    Children are never removed here, so a cached child stays the registry's.
    """
    children: dict[tuple[Any, ...], Any] = {}
    make = metric.labels

    def labels(*values: Any) -> Any:
        child = children.get(values)
        if child is None:
            child = children[values] = make(*values)
        return child

    metric.labels = labels


def observe_all(child: Any, values: Iterable[float]) -> None:
    """``child.observe(v)`` for each of ``values`` (a histogram child), in one
    pass: each value's bucket found by bisection, then the sum and each bucket
    touched once (two locks, not two frames and two locks per value). A
    gateway observes its replies' latencies this way once per read (up to
    256 replies). Uses the child's fields (``_upper_bounds``, ``_buckets``,
    ``_sum``: prometheus_client's ``Histogram`` since 0.4); without them, one
    ``observe`` each. A NaN counts in the sum and in no bucket, as with ``observe``."""
    try:
        bounds, buckets, total = child._upper_bounds, child._buckets, child._sum
    except AttributeError:
        for value in values:
            child.observe(value)
        return
    values = list(values)
    if not values:
        return
    top = bounds[-1]  # +Inf: every number is at most it, a NaN is not
    total.inc(sum(values))
    for i, n in Tally(bisect_left(bounds, v) for v in values if v <= top).items():
        buckets[i].inc(n)


class ServiceCollector(Collector):
    """Gauges read at scrape time from the running service."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._read()
        live = GaugeMetricFamily("oms_order_actors", "Order actors by kind", labels=["kind"])
        live.add_metric(["live"], snap.get("live", 0))
        live.add_metric(["passivated"], snap.get("passivated", 0))
        yield live
        states = GaugeMetricFamily("oms_orders_in_state", "Unfinished orders per state",
                                   labels=["state"])
        counts = snap.get("states", {})
        for state in UNFINISHED:
            states.add_metric([state], counts.get(state, 0))
        yield states
        mbox = GaugeMetricFamily("oms_actor_mailbox_depth", "Messages waiting in actor "
                                 "inboxes", labels=["actor"])
        for name, depth in sorted(snap.get("mailboxes", {}).items()):
            mbox.add_metric([name], depth)
        yield mbox
        yield GaugeMetricFamily("oms_oldest_held_order_age_seconds", "Seconds since the "
                                "longest-held unfinished order became held (0: none held)",
                                value=snap.get("oldest_held_s", 0))
        yield GaugeMetricFamily("oms_in_flight_orders", "Unfinished orders (admission count)",
                                value=snap.get("in_flight", 0))
        yield GaugeMetricFamily("oms_store_map_size_bytes", "LMDB map size",
                                value=snap.get("map_size", 0))
        yield GaugeMetricFamily("oms_store_used_bytes", "LMDB bytes in use",
                                value=snap.get("used", 0))
        breaker = GaugeMetricFamily("oms_gateway_pending_commands", "Commands awaiting a "
                                    "reply", labels=["system"])
        for system, n in sorted(snap.get("pending", {}).items()):
            breaker.add_metric([system], n)
        yield breaker
        breakers = GaugeMetricFamily("oms_gateway_breaker_state", "Circuit breaker: 0 closed, "
                                     "1 half-open, 2 open", labels=["system"])
        for system, level in sorted(snap.get("breakers", {}).items()):
            breakers.add_metric([system], level)
        yield breakers
        yield from _retention_families(snap)
        ready = GaugeMetricFamily("oms_ready", "1 when recovered and accepting orders",
                                  value=1 if snap.get("ready") else 0)
        yield ready


FINISHED = ("completed", "partial", "failed", "cancelled")


def _retention_families(snap: dict[str, Any]) -> Iterator[Any]:
    """The live store by state, the archive, and how far behind retention is."""
    ret = snap.get("retention")
    if ret is None:
        return
    live = GaugeMetricFamily("oms_store_live_orders", "Orders in the live store by state "
                             "(unfinished ones, and finished ones not yet archived)",
                             labels=["state"])
    unfinished, finished = snap.get("states", {}), ret["finished_live"]
    for state in UNFINISHED:
        live.add_metric([state], unfinished.get(state, 0))
    for state in sorted(set(FINISHED) | set(finished)):
        live.add_metric([state], finished.get(state, 0))
    yield live
    yield CounterMetricFamily("oms_archived_orders", "Orders moved to the archive (kept "
                              "across restarts)", value=ret["archived_total"])
    yield GaugeMetricFamily("oms_archive_dedup_entries", "Archived orders still inside the "
                            "dedup window (their external id answers duplicate)",
                            value=ret["archived_in_window"])
    yield GaugeMetricFamily("oms_retention_oldest_finished_age_seconds", "Age of the oldest "
                            "finished order still in the live store (0: none)",
                            value=ret["oldest_finished_age_s"])
    yield GaugeMetricFamily("oms_retention_seconds", "Configured retention (0: keep forever)",
                            value=ret["retention_s"])
    yield GaugeMetricFamily("oms_store_file_bytes", "Size of the LMDB data file on disk",
                            value=ret["file_bytes"])

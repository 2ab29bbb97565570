"""Process-wide tuning of the interpreter for long-running, busy processes.

CPython's cycle collector runs a young-generation pass every 700 net
allocations and, every so often, a full pass over the whole heap with every
thread stopped. A busy service allocates hundreds of thousands of short-lived
objects a second and keeps thousands of in-flight orders alive for a second
or two, so they are promoted and the full passes come often and grow with
the heap: measured on the retail bench, 12 % of the service's CPU went to the
collector (19 full passes of about 35 ms in 9 s).

The service's own objects form no reference cycles (order actors release
their inbox when they stop, see ``actors.pool``), so reference counting frees
them and the collector only needs to run rarely, as a safety net.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 2, 700)
"""Young pass every 50,000 allocations; a middle pass every third young
pass (CPython runs it when more than 2 young passes have run since the
last): it examines what they left, some 200,000 objects at most, never the
twenty-one passes' worth, a million objects and 0.44 s with every thread
stopped, that a threshold of 20 let pile up while tens of thousands of
orders were in memory; a full pass after some 2,100 young passes at most, as
before (CPython also waits until a quarter of the old objects are new)."""


def tune_gc() -> None:
    """Collect less often; call once, after start-up (``oms serve``: before
    the service starts, so that recovery runs under these thresholds)."""
    gc.collect()
    gc.freeze()  # start-up objects (modules, config, definitions) are never garbage
    gc.set_threshold(*GC_THRESHOLDS)

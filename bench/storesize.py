"""The live store's size over a bench run (issue 18): a sampler of the LMDB
data file and the archive, for ``oms bench --scenario soak``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from storage import archive


class StoreSampler(threading.Thread):
    """Every ``every_s``: the data file's size, the archive's, and its files."""

    def __init__(self, data: Path, every_s: float = 10.0) -> None:
        super().__init__(name="store-sampler", daemon=True)
        self.data, self.every_s = data, every_s
        self.samples: list[dict[str, Any]] = []
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def sample(self) -> None:
        mdb = self.data / "data.mdb"
        files = archive.files(self.data)
        self.samples.append({
            "t_s": round(time.monotonic() - self._t0, 1),
            "data_mb": round(mdb.stat().st_size / 2**20, 2) if mdb.exists() else 0.0,
            "archive_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2),
            "archive_files": len(files)})

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            self.sample()

    def finish(self) -> dict[str, Any]:
        self._done.set()
        self.join(self.every_s + 5)
        self.sample()
        orders = sum(1 for f in archive.files(self.data) for _ in archive.iter_file(f))
        size = sum(f.stat().st_size for f in archive.files(self.data))
        return {"every_s": self.every_s, "samples": self.samples, "archived_orders": orders,
                "archive_bytes_per_order": round(size / orders) if orders else None}


def render(store: dict[str, Any]) -> str:
    lines = ["", "store size over the run (data.mdb = live LMDB store; archive = gzip files):",
             f"  {'t (s)':>7} {'data.mdb MB':>12} {'archive MB':>11}"]
    lines += [f"  {s['t_s']:>7.0f} {s['data_mb']:>12.2f} {s['archive_mb']:>11.2f}"
              for s in store["samples"]]
    if store.get("archived_orders"):
        lines.append(f"  {store['archived_orders']} orders archived, "
                     f"{store['archive_bytes_per_order']} bytes each on disk")
    return "\n".join(lines)

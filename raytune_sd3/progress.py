"""Progress for long work, for a person: a bar on a terminal (done, rate, ETA), a plain line every 30 s where the
output is a log (`ray job logs`, CI), so a file never fills with carriage returns."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("raytune_sd3")
LOG_EVERY_S = 30.0


class Progress:
    """`with Progress("caching images", total, "img") as p: p.update(n); p.note(loss=...)`."""

    def __init__(self, desc: str, total: int, unit: str, initial: int = 0):
        self.desc, self.total, self.unit, self.n = desc, total, unit, initial
        self.t0 = self.last_line = time.monotonic()
        self.start_n, self.fields = initial, {}
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.moveto(self.n + n)

    def moveto(self, n: int) -> None:
        """Set the count (a resumed run starts past 0, and may go back to its checkpoint)."""
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
        self.n = n
        if self.bar is None and time.monotonic() - self.last_line >= LOG_EVERY_S:
            self._line()

    def note(self, **fields) -> None:
        """Values shown beside the count (loss, lr, ...)."""
        self.fields = fields
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.n != self.start_n:
            self._line()

    def _line(self) -> None:
        self.last_line = now = time.monotonic()
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        extra = "".join(f", {k} {v}" for k, v in self.fields.items())
        log.info("%s: %d/%d %s, %.3g %s/s, ETA %s%s", self.desc, self.n, self.total, self.unit, rate, self.unit,
                 f"{eta:.0f} s" if eta != float("inf") else "?", extra)

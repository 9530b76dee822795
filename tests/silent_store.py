"""A store that does not answer, for the tests that the preflight and `check` bound how long they retry one
(driver/preflight.py's STORE_RETRY_S): a port nothing listens on, and both checks run under a deadline."""

from __future__ import annotations

import socket
import threading

from raytune_sd3.config import ConfigError, JobConfig
from raytune_sd3.data.files import retry_limit
from raytune_sd3.driver.checks import Report, check_data
from raytune_sd3.driver.preflight import check_paths

DEADLINE_S = 60  # not a timing: without the bound the client is still retrying here


def closed_port() -> int:
    """A port nothing listens on once this returns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preflight_and_check(cfg: JobConfig) -> tuple[str, str]:
    """(the preflight's refusal, `check`'s data lines) for a job whose store does not answer, both done before the
    deadline and the retry bound left with them (the caching stage's reads keep the clients' own retries)."""
    found = {}

    def run() -> None:
        try:
            check_paths(cfg)
        except ConfigError as e:
            found["refused"] = str(e)
        report = Report()
        check_data(cfg, report)
        found["check"] = "\n".join(report.lines)

    checking = threading.Thread(target=run, daemon=True)
    checking.start()
    checking.join(DEADLINE_S)
    assert not checking.is_alive(), f"still retrying a store that does not answer (done: {sorted(found)})"
    assert retry_limit() is None
    return found["refused"], found["check"]

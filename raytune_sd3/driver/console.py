"""The console is for a person: our own lines, one progress bar per stage, warnings and errors. Everything else
goes to output_dir/ray.log, named on screen; `--verbose` brings it back to the console:
- Ray's chatter (its loggers, its workers' output, Ray Data's progress dumps, Ray Train's report lines);
- third parties' log records and Python warnings in this process (bitsandbytes' kernel hub, Ray's token-auth notice,
  matplotlib's font cache, DeepSpeed's accelerator guess, Ray Data's concurrency warning): kept from the start,
  written to ray.log once the run's folder is known;
- what native code writes to the process's stderr (Ray's C++ core worker).
transformers' own handler and Tune's configuration box are silenced at their source (QUIET_ENV).

Our workers' lines that start with "raytune_sd3:" (a resumed run says from where) still reach the console.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections import deque
from pathlib import Path

from raytune_sd3.progress import Progress
from raytune_sd3.run_layout import RunLayout

log = logging.getLogger("raytune_sd3")
WORKER_PREFIX = "raytune_sd3:"
# Read at their source before Ray starts (a local Ray's workers inherit them): transformers' own handler, set up on
# import; Tune's console reporter, whose configuration box and TensorBoard hint (a session path) are print()s even at
# verbose=0 (the legacy reporter prints nothing at 0, and its log records go to ray.log).
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "RAY_AIR_NEW_OUTPUT": "0"}
# Loggers with a handler of their own that does not propagate, set up on import: a logger filter added before that
# import survives it and takes their records.
OWN_HANDLER_LOGGERS = ("DeepSpeed",)


def is_ours(record: logging.LogRecord) -> bool:
    return record.name == "raytune_sd3" or record.name.startswith("raytune_sd3.")


class Elsewhere(logging.Handler):
    """Third parties' log records: the newest ones kept until ray.log is open, then written there."""

    def __init__(self, keep: int = 2000):
        super().__init__()
        self.early: deque[logging.LogRecord] = deque(maxlen=keep)
        self.target: logging.Handler | None = None
        self.addFilter(lambda record: not is_ours(record))

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is None:
            self.early.append(record)
        else:
            self.target.handle(record)

    def open(self, target: logging.Handler) -> None:
        self.target = target
        while self.early:
            target.handle(self.early.popleft())


elsewhere = Elsewhere()


def _take_own_handlers(record: logging.LogRecord) -> bool:
    elsewhere.handle(record)
    return False


def setup_logging(verbose: bool = False) -> None:
    """Our log lines on stderr, short; before Ray starts and before any third party is imported."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if verbose:
        return
    for noisy in ("filelock", "urllib3", "httpx", "httpx2"):  # httpx2: huggingface_hub 2.x's HTTP client
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler and not any(f is is_ours for f in handler.filters):
            handler.addFilter(is_ours)
    if elsewhere not in root.handlers:
        root.addHandler(elsewhere)
    for name in OWN_HANDLER_LOGGERS:
        if _take_own_handlers not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_take_own_handlers)
    # Python warnings are third parties' (ours are log lines): as records of "py.warnings", to ray.log. Ray Data's
    # executor, which runs in this process, warns when a data set has fewer blocks than its concurrency.
    logging.captureWarnings(True)


def native_stderr_to(path: Path) -> None:
    """What native code writes to this process's stderr (file descriptor 2) goes to `path`; sys.stderr and our
    handlers write to the console as before. Only where sys.stderr is the process's own (not a test's capture)."""
    if sys.stderr is not sys.__stderr__ or sys.stderr is None:
        return
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            handler.setStream(console)
    sys.stderr = console  # handlers third parties made before keep the old object: to ray.log now


def ray_log_to_file(out_dir: Path) -> Path:
    """Before ray.init: Ray's driver-side loggers (ray, ray.data, ray.train, ray.tune ...) and every other third
    party's records write to out_dir/ray.log only, as does native code's stderr; returns the path. Pair with
    init_ray(configure_logging=False) and route_worker_output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = RunLayout(out_dir).ray_log
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    import ray  # noqa: F401 - Ray and Ray Data set up their loggers' handlers on import: replace them after
    import ray.data  # noqa: F401

    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                  and not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(h)
        logger.propagate = True
    # To the root, where `elsewhere` takes them: ray.init(configure_logging=False) clears the "ray" logger's own
    # handlers, so one put there would lose the records of ray.init itself (its token-auth notice reached the
    # console through logging's last resort).
    logging.getLogger("ray").setLevel(logging.INFO)
    setup_logging()
    elsewhere.open(handler)
    native_stderr_to(path)
    return path


def route_worker_output(path: Path) -> None:
    """After ray.init: Ray's workers' output (actors, tasks, Ray Train's controller and workers) to `path`; our
    workers' own lines (WORKER_PREFIX) to the console as well."""
    import ray

    # private: Ray has no public hook on its workers' output (ray.init's log_to_driver is all or nothing)
    from ray._private.ray_logging import global_worker_stdstream_dispatcher  # the worker-output fan-out

    sink = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process

    def worker_output(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        for line in data.get("lines", []):
            sink.write(f"({who} pid={data.get('pid')}) {line}\n")
            if line.startswith(WORKER_PREFIX):
                print(line, file=sys.stderr, flush=True)

    if ray.is_initialized():
        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        global_worker_stdstream_dispatcher.add_handler("raytune_sd3", worker_output)


def ray_progress_bars(on: bool) -> None:
    """Ray Data's own progress bars (per operator); off by default: ours count images."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = on


class BackgroundLoop:
    """A daemon thread that calls `tick()` every `period` s while the `with` block runs, and `tick(final=True)`
    once when it ends."""

    def __init__(self, period: float, name: str):
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.tick()
        self.tick(final=True)

    def tick(self, final: bool = False) -> None:
        raise NotImplementedError


class TrainingProgress(BackgroundLoop):
    """A bar over the optimizer steps, fed by rank 0's metrics.jsonl as it grows (step, loss, lr, images/s).

    The file is read from where the last read stopped (a long run's log is not re-read twice a second); when it
    shrinks (a resumed run drops the lines past its checkpoint) it is read again from the start."""

    def __init__(self, out_dir: Path, max_steps: int, desc: str = "training", poll_s: float = 0.5):
        super().__init__(poll_s, "raytune_sd3-progress")
        self.path, self.max_steps, self.desc = RunLayout(out_dir).metrics, max_steps, desc
        self._offset, self._last_step, self._last = 0, 0, None
        self._read_new()
        self.bar = None

    def _read_new(self) -> None:
        """Take the complete lines appended since the last read; remember the newest step and training record."""
        try:
            size = self.path.stat().st_size
            if size < self._offset:  # rewritten shorter: a resume
                self._offset, self._last_step, self._last = 0, 0, None
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(size - self._offset)
        except OSError:
            return
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self._last_step = max(self._last_step, record.get("step", 0))
            if "loss" in record:
                self._last = record

    def tick(self, final: bool = False) -> None:
        if self.bar is None:
            self.bar = Progress(self.desc, self.max_steps, "step", initial=self._last_step)
        self._read_new()
        if self._last is not None:
            last = self._last
            self.bar.note(loss=f"{last['loss']:.4g}", lr=f"{last['lr']:.2g}", img_s=f"{last.get('images_per_s', 0):.3g}")
            self.bar.moveto(last["step"])
        if final:
            self.bar.close()

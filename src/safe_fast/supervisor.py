"""``safe-fast serve --workers N``: N server processes on one port, supervised.

Theory of operation
-------------------

The supervisor does not serve. It starts N copies of the same command line
(``python -m safe_fast serve ...``) with ``SAFE_FAST_WORKER_OF=<its pid>`` in
their environment; each worker binds its own listening socket to the same
port with ``SO_REUSEPORT``, and the kernel spreads new connections over
them. Workers share nothing but Redis (the fan-out and the replay window:
every subscriber on every worker gets every broadcast) and the metrics
directory (``PROMETHEUS_MULTIPROC_DIR``, so any worker's ``/metrics``
answers for all of them).

A worker that exits with status 2 from its first start found a bad setting
(the one line saying which is on stderr): nothing would fix it by
restarting, so the supervisor stops the others and exits 2 too. The same
status from a restarted worker (its settings served before) is more likely
a passing fault met on the way up, and it is restarted like any other: a worker that exits while
the supervisor is not stopping is logged and started again, after a delay
that doubles (up to 10 s) while workers keep dying within 10 s of their
start, so a crash loop does not spin (status 75, something temporarily
unreachable, is the expected one then). Workers run
in their own session: a terminal's Ctrl-C reaches the supervisor only, and it
forwards one SIGTERM to each worker (each then shuts down gracefully); a
second signal kills them all at once. A worker whose supervisor is gone (its
parent pid changes) shuts itself down.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

from .config import Settings, mask_url

__all__ = ["supervise"]

logger = logging.getLogger("safe_fast.supervisor")

_POLL_SECONDS = 0.1
_MAX_RESTART_DELAY = 10.0
_STABLE_AFTER = 10.0


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.started = 0.0
        self.restart_delay = 0.0
        self.restart_at: Optional[float] = None
        self.starts = 0


def supervise(settings: Settings, argv: list[str]) -> int:
    """Run ``settings.workers`` workers of ``argv`` (the ``serve`` command line) until a signal."""
    from .cli import WORKER_ENV

    metrics_dir = tempfile.mkdtemp(prefix="safe-fast-metrics-")
    env = dict(os.environ)
    env[WORKER_ENV] = str(os.getpid())
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
    command = [sys.executable, "-m", "safe_fast", *argv]
    workers = [_Worker(index) for index in range(settings.workers)]
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}

    def spawn(worker: _Worker) -> None:
        worker.process = subprocess.Popen(command, env=env, start_new_session=True)
        worker.starts += 1
        worker.started = time.monotonic()
        worker.restart_at = None
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    logger.info(
        "supervising %d workers on %s:%s (SO_REUSEPORT), fan-out through Redis",
        settings.workers,
        settings.host,
        settings.port,
    )
    if settings.store_url.startswith("memory:"):
        logger.warning(
            "store_url is %s: each worker holds its own copy of every ShareData;"
            " proposals through different workers make different histories",
            settings.store_url,
        )
    elif settings.store_url.startswith("sqlite:"):
        logger.warning(
            "store_url is %s: every worker writes that one file, and SQLite lets one writer in at a time"
            " (fine for a few workers; PostgreSQL for more, see docs/store.md)",
            mask_url(settings.store_url),
        )
    try:
        for worker in workers:
            spawn(worker)
        while not signals:
            now = time.monotonic()
            for worker in workers:
                process = worker.process
                if process is not None and process.poll() is not None:
                    _forget_metrics(process.pid, env["PROMETHEUS_MULTIPROC_DIR"])
                    if process.returncode == 2 and worker.starts == 1:
                        logger.error("worker %d found a bad setting; stopping", worker.index)
                        worker.process = None
                        _stop(workers, settings.shutdown_timeout, signals, env["PROMETHEUS_MULTIPROC_DIR"])
                        return 2
                    lived = now - worker.started
                    worker.restart_delay = (
                        0.0 if lived >= _STABLE_AFTER else min(_MAX_RESTART_DELAY, max(0.5, worker.restart_delay * 2))
                    )
                    logger.warning(
                        "worker %d (pid %d) exited with status %s after %.1fs; restarting in %.1fs",
                        worker.index,
                        process.pid,
                        process.returncode,
                        lived,
                        worker.restart_delay,
                    )
                    worker.process = None
                    worker.restart_at = now + worker.restart_delay
                if worker.process is None and worker.restart_at is not None and now >= worker.restart_at:
                    spawn(worker)
            time.sleep(_POLL_SECONDS)
        logger.info("received %s: stopping %d workers", signal.Signals(signals[0]).name, len(workers))
        return _stop(workers, settings.shutdown_timeout, signals, env["PROMETHEUS_MULTIPROC_DIR"])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _stop(workers: list[_Worker], timeout: float, signals: list[int], metrics_dir: str) -> int:
    """SIGTERM every worker, wait (bounded) for them; a signal arriving meanwhile kills them."""
    already = len(signals)
    running = [worker.process for worker in workers if worker.process is not None]
    for process in running:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout + 2.0
    status = 0
    while running and time.monotonic() < deadline and len(signals) == already:
        for process in list(running):
            if process.poll() is not None:
                running.remove(process)
                _forget_metrics(process.pid, metrics_dir)
                if process.returncode != 0:
                    status = 1
        time.sleep(_POLL_SECONDS)
    for process in running:
        logger.warning("worker pid %d did not stop in time; killing it", process.pid)
        process.kill()
        process.wait()
        status = 1
    if len(signals) > already:
        return 128 + signals[-1]
    return status


def _forget_metrics(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges (its counters stay in the totals)."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path=directory)
    except Exception:  # the metrics of a dead worker are not worth failing the supervisor for
        logger.debug("mark_process_dead(%d) failed", pid, exc_info=True)

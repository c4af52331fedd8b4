"""Bounded waiting for tests: nothing may hang, every wait has a deadline."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable

import pytest


def bounded(fn: Callable[[], object], timeout: float, what: str = "operation") -> object:
    """Run ``fn`` in a daemon thread; fail the test (instead of hanging) after ``timeout``."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not finish within {timeout:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


def poll(cond: Callable[[], object], timeout: float = 15.0, interval: float = 0.05) -> object:
    """The first truthy value of ``cond()``, or its last (falsy) value once ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> object:
    """The first truthy value of ``cond()``; fails the test if none comes within ``timeout``."""
    value = poll(cond, timeout, interval=0.1)
    if not value:
        pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
    return value


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = out.get(name, 0.0) + float(value)
    return out


def wait_metric(port: int, want: dict[str, float], timeout: float = 15.0) -> dict[str, float]:
    """Scrape until every metric in ``want`` has its value (each process refreshes its
    gauges once a second, on its own clock) or the time is up; return the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        if all(m.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)

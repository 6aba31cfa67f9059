"""The thread policy: one thread per heavy job on small machines, else the cores that are free right now."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genadapt import runs


def test_the_requested_count_wins_then_the_environment_then_the_machine(monkeypatch):
    monkeypatch.delenv("GENADAPT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runs.choose_threads(3) == 3
    monkeypatch.setenv("GENADAPT_THREADS", "5")
    assert runs.choose_threads() == 5
    monkeypatch.delenv("GENADAPT_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert runs.choose_threads() == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert runs.choose_threads() == 1  # two threads beside any busy process stall every barrier


def test_free_cores_subtract_what_is_busy_now(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(runs, "_busy_cores", lambda seconds=0.25: 3.0)
    assert runs.free_cores() == 5
    monkeypatch.setattr(runs, "_busy_cores", lambda seconds=0.25: 7.9)
    assert runs.free_cores() == 1  # never fewer than one
    monkeypatch.setattr(runs, "_busy_cores", lambda seconds=0.25: None)  # no /proc/stat: the load average
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    assert runs.free_cores() == 6


def test_a_busy_process_is_seen_at_once():
    """The 1-minute load average lags a program that just started; /proc/stat over a quarter second does not."""
    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat on this system: free cores come from the load average there")
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = runs._busy_cores(0.5)
    finally:
        loop.kill()
        loop.wait()
    assert busy >= 0.7

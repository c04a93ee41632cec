"""Processes a test starts and must not leave behind."""

from __future__ import annotations

import subprocess


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Kill each process of ``procs`` still running (a launcher a failed test left running;
    its tasks go with it), emptying the list."""
    while procs:
        proc = procs.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

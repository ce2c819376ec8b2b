"""Resident-set-size probes for the memory benchmarks (Linux /proc, psutil fallback).

Why not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the high-water mark across ``execve``, so a child
started from a large parent (pytest after the speed benchmarks) reports the *parent's* peak. ``VmHWM`` in
/proc/self/status belongs to the process's own address space, and writing ``5`` to /proc/self/clear_refs resets
it, so a peak can be taken over exactly the phase being measured.
"""
from __future__ import annotations

import re

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)


def rss() -> int:
    """Current resident set size in bytes."""
    import psutil
    return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Resets the peak-RSS mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size in bytes since process start or the last successful ``reset_peak()``."""
    try:
        with open("/proc/self/status") as f:
            m = _HWM.search(f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    raise RuntimeError("peak RSS needs /proc/self/status (VmHWM); this platform does not provide it")

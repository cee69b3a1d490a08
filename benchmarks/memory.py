"""Peak memory of one process, for the benchmarks' child-process probes (Linux /proc; getrusage elsewhere).

getrusage's ru_maxrss is not enough on its own: a child forked from a large parent starts with the parent's
peak, so the probes restart the peak count (VmHWM) once the baseline is taken.
"""
from __future__ import annotations

import resource
from pathlib import Path


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Restart the process's peak-RSS count (VmHWM) from its current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 1024
    except (OSError, KeyError):
        return False


def peak_bytes(was_reset: bool) -> int:
    """Peak RSS since `reset_peak` (when it worked), else since the process started."""
    if was_reset:
        return _status_kb("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

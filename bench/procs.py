"""The machine's processes from ``/proc``: names, parents, CPU ticks, command lines."""

from __future__ import annotations

import os
from pathlib import Path


def process_table() -> dict[int, tuple[str, int, int]]:
    """Every process: pid → (command name, parent pid, CPU ticks used so far)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        close = stat.rindex(")")
        fields = stat[close + 2 :].split()
        # After "pid (comm)": state, ppid, …, utime and stime are the 12th and 13th.
        table[int(entry)] = (
            stat[stat.index("(") + 1 : close],
            int(fields[1]),
            int(fields[11]) + int(fields[12]),
        )
    return table


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""

"""CPU seconds of this process and all its descendants, read from /proc (the benches share it).

CPU time, unlike wall time, stays meaningful on a machine shared with other jobs.
"""

from __future__ import annotations

import os
import threading

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by this process and every process it started, directly or not.

    Each `read()` scans /proc, adopts new descendants (a process stays counted after it is
    re-parented) and remembers each one's own last user+system time, so a process that exits
    between two reads loses only what it used since the last one. Reaped children's time
    (cutime) is not added: it would count exited DataLoader workers twice.
    """

    def __init__(self, exclude: set[int] = frozenset()) -> None:
        self.exclude = set(exclude)  # pids not counted, with everything below them
        self.known: dict[tuple[int, int], float] = {}  # (pid, start tick) -> cpu seconds

    def read(self) -> float:
        stats: dict[int, tuple[int, int, float]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = sum(int(value) for value in fields[11:13]) / CLOCK_TICKS
            stats[int(entry)] = (int(fields[1]), int(fields[19]), cpu)
        members = {pid for pid, start in self.known} | {os.getpid()}
        changed = True
        while changed:
            found = {
                pid
                for pid, (parent, _, _) in stats.items()
                if parent in members and pid not in self.exclude
            }
            changed = not found <= members
            members |= found
        for pid in members:
            if pid in stats:
                _, start, cpu = stats[pid]
                self.known[(pid, start)] = max(cpu, self.known.get((pid, start), 0.0))
        return sum(self.known.values())

    def start(self) -> CpuMeter:
        """Begin measuring in the background: a thread reads every 0.2 s, so processes that
        start and exit between the caller's reads (Ray workers, tasks) are still counted."""
        self.baseline = self.read()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stopping.wait(0.2):
            self.read()

    def stop(self) -> float:
        """CPU seconds used since `start()`."""
        self.stopping.set()
        self.thread.join()
        return self.read() - self.baseline

"""How many torch threads a CPU process should use beside whatever else shares the machine.

An intra-op thread that waits at a barrier for a sibling whose core was taken by another job
holds the whole op: with as many threads as cores and one busy neighbour, every small op waits
for a scheduler time slice. Using only the cores the neighbours leave free avoids that.
"""

from __future__ import annotations

import os


def fair_threads(ceiling: int, own_busy: int = 0) -> int:
    """Cores of this process's affinity that other processes leave free, between 1 and `ceiling`.

    `own_busy` is how many threads this process itself keeps running (they count in the load average).
    """
    cores = len(os.sched_getaffinity(0))
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform: keep the ceiling
        return max(1, ceiling)
    free = cores - max(0.0, load - own_busy)
    return max(1, min(ceiling, int(free + 0.5)))

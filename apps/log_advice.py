"""The warnings in Ray's log files that a user should act on, one line each.

With the launcher's output kept to its own table (Ray's, the engines' and the replicas' output
goes to Ray's log files), a warning that asks for action would go unseen. Once the models have
started, the launcher looks through the session's logs for the known ones (Ray's own below, each
engine's ``Engine.log_advice``) and prints one line for each that occurred.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

#: Ray's own: (a pattern of its log line, what to do)
RAY_ADVICE: tuple[tuple[str, str], ...] = (
    (r"killed due to the node running low on memory",
     "Ray killed workers, the machine being short of memory: serve fewer or smaller models, "
     "or give them less (their engine_kwargs)"),
)

#: the log files a session's processes write (workers' stdout and stderr, Serve's own)
_NAMES = re.compile(r"^(worker-.*\.(err|out)|raylet\.(err|out)|.*\.log)$")


def advice(logs_dir: str, engine_advice: Iterable[tuple[str, str]] = ()) -> list[str]:
    """One line for each known warning found in the log files under ``logs_dir``, in the
    order of the patterns (Ray's, then ``engine_advice``), each once however often it
    occurred."""
    patterns = [(re.compile(p), what) for p, what in (*RAY_ADVICE, *engine_advice)]
    found: set[int] = set()
    for root, _, files in os.walk(logs_dir):
        for name in files:
            if not _NAMES.match(name):
                continue
            try:
                with open(os.path.join(root, name), errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            found.update(i for i, (pattern, _) in enumerate(patterns) if i not in found and pattern.search(text))
    lines: list[str] = []
    for i in sorted(found):
        if patterns[i][1] not in lines:
            lines.append(patterns[i][1])
    return lines

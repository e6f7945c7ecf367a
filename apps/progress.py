"""What the launcher shows while models start: a live table of each model's state, then where
the server is and one call to try.

Fed by ``apps.serving.served(progress=...)`` with the ingress's ``ModelRouter.states``.
"""

from __future__ import annotations

import time
from typing import Any

from core.config import AppConfig

#: a state's colour in the table
STYLE = {"ready": "green", "starting": "yellow", "failed": "bold red"}


class StartupTable:
    """A Rich live table, one row per model: its kind, placement, state, the seconds from the
    launcher's start to its being ready or failed (or so far) and what it waits for, or why it failed: :meth:`start`, call it with
    each new set of states, :meth:`stop`."""

    def __init__(self, cfg: AppConfig, console=None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.cfg = cfg
        self.console = console or Console()
        self.began = time.monotonic()
        self.states: dict[str, dict[str, Any]] = {}
        self.settled: dict[str, float] = {}  # model id -> when it was first seen ready or failed
        self.live = Live(self._render(), console=self.console, auto_refresh=self.console.is_terminal,
                         refresh_per_second=2, transient=False)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        """Show the last states and stop updating (again: nothing)."""
        if self.live.is_started:
            self.live.update(self._render(), refresh=True)
            self.live.stop()
            if not self.console.is_terminal:
                self.console.print()

    def __call__(self, states: dict[str, dict[str, Any]]) -> None:
        changed = {m: (s["state"], s["detail"]) for m, s in states.items()} != \
            {m: (s["state"], s["detail"]) for m, s in self.states.items()}
        self.states = states
        now = time.monotonic() - self.began
        for model_id, s in states.items():  # seconds from the launcher's start, as the others
            if s["state"] != "starting":
                self.settled.setdefault(model_id, now)
        if changed or self.console.is_terminal:  # a log file gets a row set per change only
            self.live.update(self._render(), refresh=not self.console.is_terminal)

    def _render(self):
        from rich.table import Table

        now = time.monotonic() - self.began
        table = Table(title="models", title_justify="left", expand=False)
        for col in ("model", "kind", "placement", "state", "s", "waiting for / why"):
            table.add_column(col, justify="right" if col == "s" else "left",
                             overflow="fold" if col.startswith("waiting") else "ellipsis")
        for model in self.cfg.model.values():
            s = self.states.get(model.model_id, {"state": "deploying", "detail": "", "ready_after_s": None})
            state = s["state"]
            seconds = f"{self.settled.get(model.model_id, now):.0f}"
            table.add_row(model.model_id, model.modality, model.deployment.placement,
                          f"[{STYLE.get(state, 'yellow')}]{state}[/]", seconds, s.get("detail", ""))
        return table


def first_call(cfg: AppConfig, url: str, ready: set[str]) -> str | None:
    """One ``curl`` to try against a ready model: the first text model's, else the first's."""
    models = [m for m in cfg.model.values() if m.model_id in ready]
    if not models:
        return None
    text = [m for m in models if m.modality == "text"]
    model = (text or models)[0]
    if model.modality == "text":
        body = f'{{"model_id": "{model.model_id}", "input": "Hello", "params": {{}}}}'
        return f"curl -s {url}/v1/infer -H 'content-type: application/json' -d '{body}'"
    return f"curl -s {url}/v1/models/{model.model_id}"

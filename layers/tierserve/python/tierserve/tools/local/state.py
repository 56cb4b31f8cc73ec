"""Where a running ``tierserve local`` can be found: its state file in the work folder, which
the other ``tierserve local`` commands (``put``, ``invoke``) read."""

from __future__ import annotations

import json
from pathlib import Path

STATE_FILE = "local-stack.json"


class LocalStackNotRunning(RuntimeError):
    """No ``tierserve local`` runs for this work folder; the message says how to start one."""


def write_state(work_dir: Path, **state: str) -> None:
    """Record where the running stack's services are (merged into what is recorded)."""
    path = work_dir / STATE_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **state}, indent=2) + "\n")


def read_state(work_dir: Path) -> dict[str, str]:
    """Where the running ``tierserve local`` put its S3 and queue.

    Raises:
        LocalStackNotRunning: no state file in ``work_dir``.
    """
    state_file = work_dir / STATE_FILE
    try:
        return dict(json.loads(state_file.read_text()))
    except (OSError, ValueError):
        raise LocalStackNotRunning(
            f"no {state_file.resolve()}: start `tierserve local` first, and run this from the same "
            "folder or pass --work-dir with the folder `tierserve local` uses"
        ) from None

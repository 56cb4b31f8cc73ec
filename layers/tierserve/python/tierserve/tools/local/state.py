"""Where a running ``tierserve local`` can be found: its state file in the work folder, which
the other ``tierserve local`` commands (``put``, ``invoke``) read.

The stack writes the file last, once everything it runs answers, and removes it when it stops
(however it stops: Ctrl-C, SIGTERM, SIGHUP, a failed start). A stack killed outright (SIGKILL,
a crash) cannot remove it, so a reader checks that the recorded process is alive and that the
recorded endpoints answer before it does anything (:func:`running_stack`).
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATE_FILE = "local-stack.json"
PROBE_TIMEOUT_S = 2.0
# What every state file records; the stack adds where its other services are.
REQUIRED = ("pid", "s3_endpoint")
# The recorded services a reader checks, and how each is probed.
PROBES = {"api_url": ("API", "/v2/health/live"), "s3_endpoint": ("embedded S3", "/")}


class LocalStackNotRunning(RuntimeError):
    """No ``tierserve local`` runs for this work folder; the message says how to start one."""


def state_path(work_dir: Path) -> Path:
    return Path(work_dir) / STATE_FILE


def write_state(work_dir: Path, state: Mapping[str, Any]) -> None:
    """Record where the running stack's services are, in one step (a reader never sees half a
    file)."""
    path = state_path(work_dir)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(dict(state), indent=2) + "\n")
    partial.replace(path)


def remove_state(work_dir: Path, pid: int | None = None) -> None:
    """Remove the state file (only if it names ``pid``, when given: a stack removes its own)."""
    path = state_path(work_dir)
    if pid is not None and _read(path).get("pid") != pid:
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def read_state(work_dir: Path) -> dict[str, Any]:
    """What the state file says, unchecked (see :func:`running_stack`).

    Raises:
        LocalStackNotRunning: no readable state file in ``work_dir``.
    """
    path = state_path(work_dir)
    state = _read(path)
    if not all(key in state for key in REQUIRED):
        raise LocalStackNotRunning(
            f"no `tierserve local` runs for {Path(work_dir).resolve()} (no {STATE_FILE} there): start "
            "`tierserve local` first, and run this from the same folder or pass --work-dir with the "
            "folder `tierserve local` uses"
        )
    return state


def running_stack(work_dir: Path) -> dict[str, Any]:
    """The state of the ``tierserve local`` that runs for ``work_dir``, once its process is alive
    and the services it records (API, embedded S3) answer. A file left by a stack that died is
    removed.

    Raises:
        LocalStackNotRunning: none runs, it died, or it does not answer; the message says what
            to do.
    """
    state = read_state(work_dir)
    pid = state["pid"]
    if not isinstance(pid, int) or not process_alive(pid):
        remove_state(work_dir, pid)
        raise LocalStackNotRunning(
            f"the `tierserve local` recorded in {state_path(work_dir).resolve()} (pid {pid}) is no longer "
            "running (it was killed before it could clean up): start `tierserve local` again"
        )
    for key, (what, probe) in PROBES.items():
        url = f"{str(state[key]).rstrip('/')}{probe}" if key in state else None
        if url is not None and not answers(url):
            raise LocalStackNotRunning(
                f"the `tierserve local` recorded in {state_path(work_dir).resolve()} (pid {pid}) does not "
                f"answer: its {what} at {url} is down. Stop it (Ctrl-C, or kill {pid}) and start "
                "`tierserve local` again"
            )
    return state


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP server answers at ``url`` (any status counts)."""
    if not url.startswith("http://"):
        return False  # what the stack records; nothing else is opened
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - http, checked above
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _read(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}

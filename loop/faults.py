"""Fault injection for the reliability tests: `RATCHET_FAULT=<point>[:<detail>]` kills this process with SIGKILL
when the named point is reached. Never set in production; with it unset every point is a no-op.

Points (where a crash is hardest to survive):
- `decision.before_commit:<status>`: the ratchet decision, ledger and event are written, not yet committed
- `decision.after_commit:<status>`: the decision is committed, the branch has not moved yet
- `deliver.before_mark:<event kind>`: an event was printed / posted to chat, not yet marked delivered

`<point>` alone fires the first time the point is reached; `<point>:<detail>` only where the detail matches
(e.g. `decision.after_commit:keep`).
"""

from __future__ import annotations

import os
import signal

ENV = "RATCHET_FAULT"


def point(name: str, detail: str = "") -> None:
    """SIGKILL this process when RATCHET_FAULT names this point (and, if it gives one, this detail)."""
    want = os.environ.get(ENV)
    if not want:
        return
    if want == name or (detail and want == f"{name}:{detail}"):
        os.kill(os.getpid(), signal.SIGKILL)

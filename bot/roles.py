"""Slack roles: which of viewer / operator / admin a Slack user holds, from the `slack_roles` setting.

Resolves user-group ids with usergroups.users.list (cached); never decides what a role may do (each command
declares its role in bot/commands.py).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping, Optional, Sequence

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from bot.commands import ROLES

log = logging.getLogger("ratchet.slack.roles")

GROUP_TTL_S = 300.0  # how long a user group's members are trusted before asking Slack again
DEFAULT_ROLE = "viewer"  # anyone not listed (safety first: viewers may still pause)


def is_usergroup(ident: str) -> bool:
    """User-group ids start with S (subteam); user ids with U or W."""
    return ident.startswith("S")


class Roles:
    """Maps a Slack user id to its role.

    `mapping`: role → ids (users U…/W…, user groups S…), as in `slack_roles = {operator = ["U123", "S0GROUP"]}`.
    The highest role listing the user, directly or through a group, wins; unlisted users are viewers.
    Group members come from `client.usergroups_users_list` and are cached for `ttl_s` seconds; when Slack
    cannot be asked, the last known members are used (none, the first time), so an outage never grants a role.
    Thread-safe.
    """

    def __init__(self, mapping: Optional[Mapping[str, Sequence[str]]] = None, client: Optional[WebClient] = None,
                 *, ttl_s: float = GROUP_TTL_S, clock: Callable[[], float] = time.monotonic):
        mapping = dict(mapping or {})
        unknown = set(mapping) - set(ROLES)
        if unknown:
            raise ValueError(f"slack_roles: unknown role(s) {sorted(unknown)}; use {', '.join(ROLES)}")
        self.mapping = {role: [str(i).strip() for i in mapping.get(role, []) if str(i).strip()] for role in ROLES}
        self.client = client
        self.ttl_s = ttl_s
        self.clock = clock
        self._groups: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def role_of(self, user_id: str) -> str:
        """The user's role: "admin", "operator" or "viewer"."""
        for role in reversed(ROLES):  # highest first
            for ident in self.mapping[role]:
                if ident == user_id or (is_usergroup(ident) and user_id in self.group_members(ident)):
                    return role
        return DEFAULT_ROLE

    def group_members(self, group_id: str) -> frozenset[str]:
        """User ids in a user group (cached for ttl_s; the last known set while Slack is unreachable)."""
        now = self.clock()
        with self._lock:
            cached = self._groups.get(group_id)
        if cached and now - cached[0] < self.ttl_s:
            return cached[1]
        if self.client is None:
            return cached[1] if cached else frozenset()
        try:
            users = frozenset(self.client.usergroups_users_list(usergroup=group_id).get("users") or [])
        except (SlackApiError, SlackClientError, OSError) as e:
            log.warning("usergroups.users.list %s failed: %s; using the last known members", group_id, e)
            return cached[1] if cached else frozenset()
        with self._lock:
            self._groups[group_id] = (now, users)
        return users

"""Fault tests: `ratchet serve` killed, its chat, its model API, its database and its disk failing; nothing lost."""

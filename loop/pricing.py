"""Claude API prices (USD per million tokens) and the cost of one response's usage.
Never undercounts: a model it does not know is priced at the most expensive rates in the table."""

from __future__ import annotations

from collections.abc import Mapping

# USD per million tokens, matched by model-id prefix (the longest matching prefix wins; a dated
# snapshot such as "claude-opus-4-5-20251101" matches "claude-opus-4-5").
# Source: Anthropic's pricing page, https://platform.claude.com/docs/en/about-claude/pricing
# ("Model pricing"), and the model pages it links; "cache_write" is the 5-minute write
# (1.25x input), "cache_read" a cache hit (0.1x input for most models, less where listed).
# Haiku 5.5 bills every token of a request at its `long_prompt` rates once the prompt
# (input + cache writes + cache reads) is over `threshold_tokens`.
PRICES: dict[str, dict] = {
    "claude-fable-5-1": {"input": 10.0, "output": 50.0, "cache_write": 12.5, "cache_read": 0.25},
    "claude-mythos-5-1": {"input": 10.0, "output": 50.0, "cache_write": 12.5, "cache_read": 0.25},
    "claude-fable-5": {"input": 10.0, "output": 50.0, "cache_write": 12.5, "cache_read": 1.0},
    "claude-mythos-5": {"input": 10.0, "output": 50.0, "cache_write": 12.5, "cache_read": 1.0},
    "claude-opus-5-5": {"input": 4.0, "output": 20.0, "cache_write": 5.0, "cache_read": 0.20},
    "claude-opus-5": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.50},
    "claude-opus-4-8": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.50},
    "claude-opus-4-7": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.50},
    "claude-opus-4-6": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.50},
    "claude-opus-4-5": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.50},
    "claude-opus-4": {"input": 15.0, "output": 75.0, "cache_write": 18.75, "cache_read": 1.50},  # 4.0, 4.1
    # Sonnet 5.5 cache reads were reported cut to $0.10 on 2026-10-07; kept at the model page's
    # $0.20 until the pricing page confirms it (never undercount).
    "claude-sonnet-5-5": {"input": 2.0, "output": 10.0, "cache_write": 2.5, "cache_read": 0.20},
    "claude-sonnet-5": {"input": 2.0, "output": 10.0, "cache_write": 2.5, "cache_read": 0.20},
    "claude-sonnet-4": {"input": 3.0, "output": 15.0, "cache_write": 3.75, "cache_read": 0.30},  # 4, 4.5, 4.6
    "claude-haiku-5-5": {
        "input": 0.10, "output": 0.50, "cache_write": 0.125, "cache_read": 0.01,
        "long_prompt": {"threshold_tokens": 100_000,
                        "input": 0.50, "output": 2.50, "cache_write": 0.625, "cache_read": 0.05},
    },
    "claude-haiku-4-5": {"input": 1.0, "output": 5.0, "cache_write": 1.25, "cache_read": 0.10},
}

RATE_KEYS = ("input", "output", "cache_write", "cache_read")


def rates_for(model: str, prices: Mapping[str, Mapping] | None = None) -> dict:
    """The USD-per-million-token rates of `model`: {"input", "output", "cache_write", "cache_read"}
    (plus "long_prompt" where the table has one).

    Matched by the longest prefix that is the whole id or is followed by "-" (so "claude-opus-4-5"
    never prices "claude-opus-4-50"). An unknown model gets, per rate, the highest rate in the
    table, so its cost is never undercounted.
    """
    prices = PRICES if prices is None else prices
    matches = [p for p in prices if model == p or model.startswith(p + "-")]
    if matches:
        return dict(prices[max(matches, key=len)])
    return {key: max(float(entry[key]) for entry in prices.values()) for key in RATE_KEYS}


def cost_usd(model: str, usage: Mapping[str, int | None], prices: Mapping[str, Mapping] | None = None) -> float:
    """USD cost of one Messages API response's `usage` (tokens) on `model`.

    `usage` holds input_tokens, output_tokens, cache_creation_input_tokens and
    cache_read_input_tokens (missing or None count as 0); `prices` defaults to PRICES.
    Cache writes are priced as 5-minute writes. Prompt-length tiers apply per response, so price
    each turn on its own and add up the results. An unknown model is priced at the table's
    highest rates (see rates_for).
    """
    tokens = {
        "input": usage.get("input_tokens") or 0,
        "output": usage.get("output_tokens") or 0,
        "cache_write": usage.get("cache_creation_input_tokens") or 0,
        "cache_read": usage.get("cache_read_input_tokens") or 0,
    }
    rates = rates_for(model, prices)
    long_prompt = rates.get("long_prompt")
    prompt = tokens["input"] + tokens["cache_write"] + tokens["cache_read"]
    if long_prompt and prompt > long_prompt["threshold_tokens"]:
        rates = long_prompt
    return sum(tokens[key] * float(rates[key]) for key in RATE_KEYS) / 1e6

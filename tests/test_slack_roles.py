"""Roles from config (bot/roles.py): user ids and user groups (usergroups.users.list against the fake Slack),
the highest role wins, unlisted users are viewers, group members cached, an outage never grants a role."""

from __future__ import annotations

import pytest

from bot.roles import Roles
from bot.slack_app import make_client
from loop.config import ConfigError, load_settings
from tests.fakes.slack_api import BOT_TOKEN, FakeSlack, api_error


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_listed_users_get_their_highest_role_and_others_are_viewers():
    roles = Roles({"viewer": ["U1"], "operator": ["U1", "U2"], "admin": ["U3"]})
    assert [roles.role_of(u) for u in ("U1", "U2", "U3", "U9")] == ["operator", "operator", "admin", "viewer"]
    with pytest.raises(ValueError, match="unknown role"):
        Roles({"owner": ["U1"]})


def test_user_groups_are_resolved_and_cached():
    clock = Clock()
    with FakeSlack(usergroups={"S0ONCALL": ["U5", "U6"]}) as fake:
        roles = Roles({"operator": ["S0ONCALL"]}, make_client(BOT_TOKEN, fake.api_url), ttl_s=60, clock=clock)
        assert roles.role_of("U5") == "operator" and roles.role_of("U6") == "operator"
        assert roles.role_of("U7") == "viewer"
        assert len(fake.calls_to("usergroups.users.list")) == 1  # cached
        fake.usergroups["S0ONCALL"] = ["U7"]
        assert roles.role_of("U7") == "viewer"  # still cached
        clock.t = 61
        assert roles.role_of("U7") == "operator" and roles.role_of("U5") == "viewer"
        clock.t = 200
        fake.fail("usergroups.users.list", api_error("ratelimited_elsewhere"))
        assert roles.role_of("U7") == "operator"  # Slack failed: the last known members still count
        fake.down()
        try:
            fresh = Roles({"operator": ["S0ONCALL"]}, make_client(BOT_TOKEN, fake.api_url, max_retries=0))
            assert fresh.role_of("U7") == "viewer"  # never known: no role granted during an outage
        finally:
            fake.up()


def test_slack_roles_in_ratchet_toml(tmp_path, monkeypatch):
    cfg = tmp_path / "ratchet.toml"
    monkeypatch.setenv("RATCHET_CONFIG", str(cfg))  # load_settings sets it; restored after the test
    cfg.write_text('slack_channel = "C0X"\nslack_daily_thread = true\n'
                   'slack_roles = {viewer = [], operator = ["U123", "S0GROUP"], admin = ["U9"]}\n')
    s = load_settings(cfg)
    assert s.slack_roles == {"viewer": [], "operator": ["U123", "S0GROUP"], "admin": ["U9"]}
    assert s.slack_channel == "C0X" and s.slack_daily_thread and s.slack_api_url == "https://slack.com/api/"
    cfg.write_text('slack_roles = {boss = ["U1"]}\n')
    with pytest.raises(ConfigError, match="slack_roles"):
        load_settings(cfg)


def test_slack_config_says_what_is_missing(monkeypatch):
    from bot.slack_app import SlackConfig, SlackConfigError, slack_configured
    from loop.config import Settings

    monkeypatch.delenv("SLACK_CHANNEL", raising=False)
    s = Settings(slack_channel="C0RATCHET", timezone="Europe/Berlin")
    env = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"}
    cfg = SlackConfig.from_settings(s, env)
    assert (cfg.mode, cfg.channel, cfg.timezone, cfg.api_url) == ("socket", "C0RATCHET", "Europe/Berlin",
                                                                  "https://slack.com/api/")
    assert SlackConfig.from_settings(s, {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "x"}).mode == "http"
    assert slack_configured(env) and not slack_configured({"SLACK_BOT_TOKEN": "xoxb-1"}) and not slack_configured({})
    with pytest.raises(SlackConfigError, match="SLACK_BOT_TOKEN"):
        SlackConfig.from_settings(s, {"SLACK_APP_TOKEN": "xapp-1"})
    with pytest.raises(SlackConfigError, match="SLACK_SIGNING_SECRET"):
        SlackConfig.from_settings(Settings(slack_channel="C0RATCHET", slack_mode="http"), env)
    with pytest.raises(SlackConfigError, match="SLACK_APP_TOKEN"):
        SlackConfig.from_settings(Settings(slack_channel="C0RATCHET", slack_mode="socket"),
                                  {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "x"})
    with pytest.raises(SlackConfigError, match="not '#ratchet'"):
        SlackConfig.from_settings(Settings(slack_channel="#ratchet"), env)
    monkeypatch.setenv("SLACK_CHANNEL", "G0PRIVATE")
    monkeypatch.setenv("SLACK_API_URL", "https://slack-gov.com/api")
    gov = SlackConfig.from_settings(Settings(), env)
    assert gov.channel == "G0PRIVATE" and gov.api_url == "https://slack-gov.com/api/"

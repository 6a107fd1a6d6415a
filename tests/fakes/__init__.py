"""Fakes of outside services, served on 127.0.0.1 for the real clients; tests only."""

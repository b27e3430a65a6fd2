"""Shared pytest configuration. Lab fixtures (processes, netns, Kamailio, SIPp) come from
tests/lab/fixtures.py; add project-wide fixtures below."""

pytest_plugins = ["tests.lab.fixtures"]

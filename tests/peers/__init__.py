"""Peers for the user-agent tests: scripted raw-socket SIP peers, a callee handler, and
scripts that run third-party user agents (sippy) in a subprocess."""

"""What an operator's tools talk to: the service manager and HTTP listeners.

Beside `sip/` at the bottom of the layers (it imports no other sipmesh package), so
that the broker and the daemon share one implementation of each:

- `notify`: readiness and reload notifications to systemd ($NOTIFY_SOCKET);
- `listen`: where the opt-in HTTP listeners listen (a bare port means loopback);
- `http`: those listeners over aiohttp, and a Prometheus registry served by them.
"""

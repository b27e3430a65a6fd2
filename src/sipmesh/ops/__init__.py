"""What an operator's tools talk to: the service manager and HTTP listeners.

Beside `sip/` at the bottom of the layers (it imports no other sipmesh package), so
that the broker and the daemon share one implementation of each:

- `notify`: readiness and reload notifications to systemd ($NOTIFY_SOCKET);
- `http`: the opt-in HTTP listeners (Prometheus metrics, the broker's status page):
  the HOST:PORT syntax, loopback by default, and a Prometheus registry served by aiohttp.
"""

"""The SIP super-daemon: one identity, many services, many concurrent sessions (docs/daemon.md).

Like inetd for SIP: an INVITE names a service in ``a=service:NAME``; the daemon
checks the caller, validates the offer against the service's declared parameters,
allocates ports and tunnel addresses, starts the service's program as a supervised
child and answers with the values in ``a=`` lines. Every session has its own
dialog, child and resources; one ending never disturbs another.

Modules: `config` (the TOML file), `registry` (service kinds: the layer above
fills it from apps/kinds.py), `service` (a configured service, its parameters and
callers; `ServiceProfile`, the base of every kind), `allocators` (ports, address
pools), `templates` (``{NAME}`` in argv and env), `server` (the daemon, on the
agent's Endpoint and Session), `control` (the status socket).
"""

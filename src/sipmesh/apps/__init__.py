"""The applications, above the daemon: each module is one kind of application.

exec (any program: `ExecProfile` for `sipmesh serve`/`call` and `sip_app`, with the
paper's VPN parameters; `ExecService`, the daemon's generic kind), openvpn (OpenVPN
2.6 with certificate fingerprints in a= lines), wireguard (wireguard-go with
per-session keys), forward (a TCP port forward), hello (a harmless program pair for
demonstrations). The host certificate is the agent's (`agent/certs.py`: QUIC streams
use it too). `kinds.KINDS` lists the daemon's
service kinds. This package imports nothing itself: forward, wireguard and hello
also run as the session's programs (``python -m sipmesh.apps.NAME``) and start faster so.
"""

"""SIP transport layer (RFC 3261 §18): UDP, TCP, TLS."""

from sipmesh.sip.transport.base import (DEFAULT_PORTS, RELIABLE, UDP_SIZE_THRESHOLD, Flow,
                                        Inbound, local_address_towards, response_target,
                                        uri_target)
from sipmesh.sip.transport.layer import TransportLayer, redact
from sipmesh.sip.transport.resolve import ResolveError, Resolver, resolve_uri

__all__ = ["DEFAULT_PORTS", "RELIABLE", "UDP_SIZE_THRESHOLD", "Flow", "Inbound", "TransportLayer",
           "local_address_towards", "redact", "ResolveError", "Resolver", "resolve_uri", "response_target",
           "uri_target"]

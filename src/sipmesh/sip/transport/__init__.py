"""SIP transport layer (RFC 3261 §18): UDP, TCP, TLS."""

from sipmesh.sip.transport.base import (DEFAULT_PORTS, RELIABLE, UDP_SIZE_THRESHOLD, Flow,
                                        Inbound, local_address_towards, resolve,
                                        response_target, uri_target)
from sipmesh.sip.transport.layer import TransportLayer, redact

__all__ = ["DEFAULT_PORTS", "RELIABLE", "UDP_SIZE_THRESHOLD", "Flow", "Inbound", "TransportLayer",
           "local_address_towards", "redact", "resolve", "response_target", "uri_target"]

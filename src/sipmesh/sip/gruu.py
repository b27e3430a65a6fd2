"""Public GRUUs (RFC 5627) for the members of a mesh network's roster.

A public GRUU is an AOR with a ``gr`` parameter holding a UA instance's ``+sip.instance``
URN (RFC 5627 §3.1): ``sip:net-lab@DOMAIN;gr=urn:uuid:...``. A registrar routes it to the
binding of the AOR with that instance only, not to every binding (Kamailio's `lookup()`
does so with its stock registrar module). The mesh's pair INVITEs use it to reach one
member of a network's AOR (apps/mesh.py).

A peer must know the instance to build the GRUU, and a roster (RFC 3680 reginfo, as
Kamailio's pua_reginfo writes it) does not carry instances. So a member's instance for a
network is derived from what every peer knows, the network's and the member's names: a
name-based UUID (RFC 4122 §4.3, version 5) in a namespace of our own. It is unique within
the network's AOR (a member registers only contacts with its own name) and stays the
same across restarts, as RFC 5626 §4.1 asks of an instance ID.
"""

from __future__ import annotations

import functools
import uuid

from sipmesh.sip.uri import SipURI

GR = "gr"
# the namespace of members' instance IDs (a random UUID chosen once; never change it: the
# peers of a member compute its instance with it)
MEMBER_NAMESPACE = uuid.UUID("5d0c8f3e-6a7b-4c21-9e55-3b1f0a2d7c64")


@functools.lru_cache(maxsize=8192)  # our broker matches a GRUU against every member's
def member_instance(network: str, member: str) -> str:
    """The `+sip.instance` URN of `member`'s binding under network `network`'s AOR."""
    return f"urn:uuid:{uuid.uuid5(MEMBER_NAMESPACE, f'{network}/{member}')}"


def public_gruu(aor: SipURI, instance: str) -> SipURI:
    """The AOR narrowed to one instance's binding (RFC 5627 §3.1)."""
    uri = aor.copy()
    uri.params[GR] = instance
    return uri


def instance_of(uri: object) -> str | None:
    """The instance a URI names as a public GRUU, or None (not a GRUU, or a temporary one)."""
    params = getattr(uri, "params", None) or {}
    value = params.get(GR)
    return value.strip("<>") if value else None

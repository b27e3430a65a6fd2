"""hypothesis strategies for SIP text: host names and whole SIP URIs (RFC 3261 §19.1, §25.1),
shared by the URI and message property tests."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from sipmesh.sip.uri import SipURI

ANY_TEXT = st.characters(blacklist_categories=("Cs",))  # every code point a str can encode
_ALNUM = string.ascii_lowercase + string.digits + "ABC"
_LABEL = st.builds(lambda first, middle, last: first + (middle + last if middle else ""),
                   st.sampled_from(_ALNUM), st.text(_ALNUM + "-", max_size=8), st.sampled_from(_ALNUM))
_TOPLABEL = st.builds(lambda first, rest: first + rest, st.sampled_from(string.ascii_letters),
                      st.text(_ALNUM, max_size=6))

hostnames = st.builds(lambda labels, top: ".".join([*labels, top]),
                      st.lists(_LABEL, max_size=3), _TOPLABEL)
hosts = st.one_of(hostnames, st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
param_names = st.text(ANY_TEXT, min_size=1, max_size=12).map(str.lower).filter(
    lambda s: s == s.lower())
uri_params = st.dictionaries(param_names, st.none() | st.text(ANY_TEXT, min_size=1, max_size=12),
                             max_size=4)
uri_headers = st.dictionaries(st.text(ANY_TEXT, min_size=1, max_size=10),
                              st.text(ANY_TEXT, max_size=12), max_size=3)


@st.composite
def sip_uris(draw, *, with_headers: bool = True) -> SipURI:
    user = draw(st.none() | st.text(ANY_TEXT, min_size=1, max_size=16))
    return SipURI(
        host=draw(hosts),
        user=user,
        password=None if user is None else draw(st.none() | st.text(ANY_TEXT, max_size=10)),
        port=draw(st.none() | st.integers(0, 65535)),
        scheme=draw(st.sampled_from(["sip", "sips"])),
        params=draw(uri_params),
        headers=draw(uri_headers) if with_headers else {},
    )

"""The SIP grammar (RFC 3261 §25.1) as regular expressions named after its ABNF rules.

In the style of h11's `_abnf.py`: each rule is written once, here, as a string named
after the rule it implements (`-` becomes `_`), so that larger patterns can be built
from it; the rules matched on their own are compiled here too (upper case). Only the
rules the parsers need are here, not the whole RFC. Matching is on `str`: the
parsers decode with surrogateescape first, so non-ASCII octets never match a class
written with ASCII ranges.

Modules use this one as `grammar.token` and bind the compiled patterns to names of
their own (`_TOKEN = grammar.TOKEN`) instead of `from grammar import TOKEN, port`:
CPython 3.11 compiles a method call on an imported name (`TOKEN.fullmatch(...)`), and
on any local variable that happens to share an imported name (`port`, `scheme`),
without LOAD_METHOD, and that cost the message parser 2-5%.
"""

from __future__ import annotations

import re

# -- basic rules (§25.1) ---------------------------------------------------------------------
alphanum = "A-Za-z0-9"  # the body of a character class
WSP = " \t"  # SP / HTAB, as the characters to strip
# LWS = [*WSP CRLF] 1*WSP; a line fold, with the white space around it, is one SP (§7.3.1)
fold = r"[ \t]*\r?\n[ \t]+"
# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
token = rf"[{alphanum}\-.!%*_+`'~]+"
Method = token
# SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT (compared case-insensitively)
SIP_Version = r"SIP/[0-9]+\.[0-9]+"
# qdtext = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII: HTAB and printable but " and \
qdtext = r"""[^"\\\x00-\x08\x0a-\x1f\x7f]"""
# quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F); the group is the escaped character
quoted_pair = r"\\(.)"
# 1*DIGIT, bounded so that int() stays cheap; ASCII only (str.isdigit() accepts '²')
digits = r"[0-9]{1,10}"

# -- URIs (§19.1, §25.1): what may appear unescaped in each part besides alphanum ----------
mark = "-_.!~*'()"  # unreserved = alphanum / mark
user_unreserved = "&=+$,;?/"
password_unreserved = "&=+$,"  # password = *( unreserved / escaped / "&" / "=" / "+" / "$" / "," )
param_unreserved = "[]/:&+$"
hnv_unreserved = "[]/?:+$"
hostname = (rf"(?:[{alphanum}](?:[{alphanum}\-]*[{alphanum}])?\.)*"  # *( domainlabel "." )
            rf"[A-Za-z](?:[{alphanum}\-]*[{alphanum}])?\.?")  # toplabel [ "." ]
IPv4address = r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}"
port = r"[0-9]{1,5}"
scheme = r"[A-Za-z][A-Za-z0-9+\-.]*"

# -- §8.1.1.7: a branch starting with the magic cookie is an RFC 3261 transaction id ---------
MAGIC_COOKIE = "z9hG4bK"

# -- the rules matched on their own, compiled once -------------------------------------------
TOKEN = re.compile(token)
SIP_VERSION = re.compile(SIP_Version, re.IGNORECASE)
FOLD = re.compile(fold)
QUOTED_PAIR = re.compile(quoted_pair, re.DOTALL)
DIGITS = re.compile(digits)
# The octets a token may hold: what a stream must start with (a method, or "SIP/").
TOKEN_OCTETS = frozenset(c for c in range(128) if TOKEN.fullmatch(chr(c)))

"""A network-namespace lab of real processes: the NAT lab of the tests and of
`sipmesh demo --lab`, one builder for both.

* ``topology``: an "internet" bridge, public hosts, hosts behind home, symmetric and
  UDP-blocking routers (namespaces, veths, iptables), built in one batch;
* ``natsite``: our broker and coturn on a public host, `sipmesh` agents on the others;
* ``coturn``: the TURN relay; ``netns``: namespaces; ``procs``: managed processes in their
  own process groups; ``waiting``: the one bounded wait.

Addresses inside the lab are documentation and private ranges, and they never leave its
namespaces. Needs root (``netns.netns_unavailable_reason`` says why not).
"""

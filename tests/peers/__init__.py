"""What the code under test talks to, in the test's own process: the raw UDP SIP peer
(`raw`), a callee handler and fast timers (`helpers`), the broker and the daemon in-process
(`broker`, `daemon`), sippy in a subprocess (`sippy_run`, `sippy_peer.py`), a TCP service
(`tcp`), and generated SIP text (`strategies`)."""

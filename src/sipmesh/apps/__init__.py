"""Application profiles for the agent: exec (any program, and the paper's VPN parameters),
openvpn (OpenVPN 2.6 with certificate fingerprints in a= lines), and hello (a harmless
program pair for demonstrations)."""

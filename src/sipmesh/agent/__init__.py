"""The agent: registers a name, answers or places sessions, carries application parameters
in SDP a= lines, starts and supervises the application (the successor of the prototype
sip_app). Depends on the SIP core only; application profiles live in sipmesh.apps."""

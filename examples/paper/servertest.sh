#!/bin/sh
# Test: PC1, user 2500, server mode (waits for an INVITE, runs openvpn_server.sh)

./sip_app -s 202.26.159.131 -u 2500 -d -f ./log/server`date +%m%d%H%M`.txt -m ./openvpn_server.sh

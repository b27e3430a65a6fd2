#!/bin/sh
# Normal: PC2, user 2501, client mode (INVITEs 2500, runs openvpn_client.sh)

./sip_app -s 202.26.159.131 -u 2501 -t 2500 -d -f ./log/client`date +%m%d%H%M`.txt -m ./openvpn_client.sh

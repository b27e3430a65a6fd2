#!/bin/sh
#
# sip_app - OpenVPN(Client) Connector
#   $1 IP4 (the server's address)  $2 PORT  $3 VPN_LOCAL_ADDR  $4 VPN_REMOTE_ADDR
#   (the server's local tunnel address is our remote one, hence "$4 $3")
#default

/usr/local/sbin/openvpn --config default.conf --remote $1 --rport $2 --ifconfig $4 $3

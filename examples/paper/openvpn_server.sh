#!/bin/sh
#
# sip_app - OpenVPN(Server) Connector
#   $1 PORT  $2 VPN_LOCAL_ADDR  $3 VPN_REMOTE_ADDR
#default

/usr/local/sbin/openvpn --config default.conf --lport $1 --ifconfig $2 $3

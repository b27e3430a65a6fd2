#!/bin/sh
# Turn a `sipmesh broker` users file into Kamailio db_text tables (version, subscriber)
# for docs/kamailio/kamailio.cfg. Only the MD5 HA1 column moves over: that config
# authenticates with MD5 HA1 hashes, and no password is needed or stored anywhere.
#
#   sh users-to-dbtext.sh USERS_FILE DBTEXT_DIR
#
# Re-run it after every `sipmesh broker users add|remove` and restart Kamailio
# (db_text reads its files when it starts).
set -eu
users=$1
dir=$2
mkdir -p "$dir"
printf 'id(int,auto) table_name(string) table_version(int) \n0:subscriber:7\n' > "$dir/version"
{
    printf 'id(int,auto) username(string) domain(string) ha1(string) \n'
    # users file lines: realm user md5-ha1 sha256-ha1 ('#' starts a comment)
    awk '!/^[ \t]*#/ && NF == 4 { printf "%d:%s:%s:%s\n", ++n, $2, $1, $3 }' "$users"
} > "$dir/subscriber.tmp"
mv "$dir/subscriber.tmp" "$dir/subscriber"
chmod 600 "$dir/subscriber"

#!/bin/sh
# Turn a `sipmesh broker` users file into Kamailio db_text tables for
# docs/kamailio/kamailio.cfg: `subscriber` (the users of every realm, mesh networks'
# included: a network's realm is its name) and `version`; and the empty tables of the
# mesh networks' roster (presence, pua: presentity, pua, active_watchers, watchers) when
# they are missing. Only the MD5 HA1 column moves over: that config authenticates with
# MD5 HA1 hashes, and no password is needed or stored anywhere.
#
#   sh users-to-dbtext.sh USERS_FILE DBTEXT_DIR
#
# Re-run it after every `sipmesh broker users add|remove` and restart Kamailio
# (db_text reads its files when it starts).
set -eu
users=$1
dir=$2
mkdir -p "$dir"
printf '%s\n' 'id(int,auto) table_name(string) table_version(int) ' '0:subscriber:7' '0:presentity:5' \
    '0:pua:7' '0:active_watchers:12' '0:watchers:3' > "$dir/version"
{
    printf 'id(int,auto) username(string) domain(string) ha1(string) \n'
    # users file lines: realm user md5-ha1 sha256-ha1 ('#' starts a comment)
    awk '!/^[ \t]*#/ && NF == 4 { printf "%d:%s:%s:%s\n", ++n, $2, $1, $3 }' "$users"
} > "$dir/subscriber.tmp"
mv "$dir/subscriber.tmp" "$dir/subscriber"
chmod 600 "$dir/subscriber"
table() {  # NAME COLUMNS: an empty table, unless there is one already
    [ -e "$dir/$1" ] || printf '%s \n' "$2" > "$dir/$1"
}
table presentity 'id(int,auto) username(string) domain(string) event(string) etag(string) expires(int) received_time(int) body(string) sender(string) priority(int) ruid(string,null)'
table pua 'id(int,auto) pres_uri(string) pres_id(string) event(int) expires(int) desired_expires(int) flag(int) etag(string) tuple_id(string,null) watcher_uri(string) call_id(string) to_tag(string) from_tag(string) cseq(int) record_route(string,null) contact(string) remote_contact(string) version(int) extra_headers(string)'
table active_watchers 'id(int,auto) presentity_uri(string) watcher_username(string) watcher_domain(string) to_user(string) to_domain(string) event(string) event_id(string,null) to_tag(string) from_tag(string) callid(string) local_cseq(int) remote_cseq(int) contact(string) record_route(string,null) expires(int) status(int) reason(string) version(int) socket_info(string) local_contact(string) from_user(string) from_domain(string) updated(int) updated_winfo(int) flags(int) user_agent(string,null)'
table watchers 'id(int,auto) presentity_uri(string) watcher_username(string) watcher_domain(string) event(string) status(int) reason(string,null) inserted_time(int)'

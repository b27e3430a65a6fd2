"""Names for a mesh network's members (agent/hostsfile.py): the marked block in a hosts
file; hostile roster names kept out, the rest of the file kept byte for byte."""

from __future__ import annotations

import os

from sipmesh.agent.hostsfile import HostsFile, entries_of, merge, render

HOSTS = ("127.0.0.1\tlocalhost\n"
         "::1 localhost ip6-localhost # a comment\n"
         "\n"
         "192.0.2.7 bob   # a machine of the LAN called bob\n"
         "10.0.0.1 caf\xe9-\udcff host\r\n"          # bytes that are not UTF-8, a CRLF line
         "# a last line without its newline")
MEMBERS = {"alice": "100.64.0.1", "bob": "100.64.0.2", "Carol": "100.64.0.3"}


def test_block_lists_every_member_and_keeps_the_rest_of_the_file():
    text, refused = merge(HOSTS, "lab", MEMBERS)
    assert refused == []
    assert text.startswith(HOSTS)  # every byte of the others' lines, in place
    assert text[len(HOSTS):] == (
        "\n# sipmesh network lab: begin (written by `sipmesh up`, do not edit)\n"
        "100.64.0.3 carol.lab carol\n"
        "100.64.0.1 alice.lab alice\n"
        "100.64.0.2 bob.lab\n"          # bob: the LAN's bob keeps the short name
        "# sipmesh network lab: end\n")
    assert entries_of(text, "lab") == {"alice.lab": "100.64.0.1", "alice": "100.64.0.1",
                                       "bob.lab": "100.64.0.2", "carol.lab": "100.64.0.3",
                                       "carol": "100.64.0.3"}


def test_merging_is_idempotent_and_updates_in_place():
    once, _ = merge(HOSTS, "lab", MEMBERS)
    assert merge(once, "lab", MEMBERS)[0] == once
    other, _ = merge(once + "203.0.113.9 after\n", "lab", {"alice": "100.64.0.9"})
    assert other.endswith("# sipmesh network lab: end\n203.0.113.9 after\n")  # stays where it was
    assert entries_of(other, "lab") == {"alice.lab": "100.64.0.9", "alice": "100.64.0.9"}
    # another network's block is another network's
    both, _ = merge(other, "ops", {"alice": "100.65.0.1"})
    assert entries_of(both, "lab") == entries_of(other, "lab")
    assert entries_of(both, "ops") == {"alice.ops": "100.65.0.1"}  # "alice" is lab's already
    # leaving removes exactly the block
    assert merge(merge(both, "ops", {})[0], "lab", {})[0] == HOSTS + "\n203.0.113.9 after\n"


def test_hostile_names_and_addresses_never_reach_the_file():
    hostile = {"evil\n1.2.3.4 bank.example": "100.64.0.9", "a b": "100.64.0.9",
               "-x": "100.64.0.9", "x" * 64: "100.64.0.9", "dot.ted": "100.64.0.9",
               "ok": "100.64.0.9\n6.6.6.6 bank", "fine": "100.64.0.10",
               "v6": "fd00::1", "": "100.64.0.9", "ünï": "100.64.0.9"}
    lines, refused = render("lab", hostile)
    assert lines == ["100.64.0.10 fine.lab fine", "fd00::1 v6.lab v6"]
    assert len(refused) == len(hostile) - 2
    assert render("evil lab", {"fine": "100.64.0.10"})[0] == []
    text, _ = merge("", "lab", hostile)
    assert "bank" not in text and "6.6.6.6" not in text and text.count("\n") == 4


def test_a_forged_marker_in_a_name_cannot_end_the_block_early():
    text, _ = merge("", "lab", {"# sipmesh network lab: end": "100.64.0.1", "a": "100.64.0.2"})
    assert entries_of(text, "lab") == {"a.lab": "100.64.0.2", "a": "100.64.0.2"}


def test_the_file_is_replaced_atomically_keeping_its_mode(tmp_path):
    path = tmp_path / "hosts"
    path.write_bytes(HOSTS.encode("utf-8", "surrogateescape"))
    os.chmod(path, 0o640)
    names = HostsFile(path, "lab")
    names.update(MEMBERS)
    inode = path.stat().st_ino
    names.update(MEMBERS)  # unchanged: not rewritten
    assert path.stat().st_ino == inode and path.stat().st_mode & 0o777 == 0o640
    assert path.read_bytes().startswith(HOSTS.encode("utf-8", "surrogateescape"))
    names.remove()
    assert path.read_bytes() == HOSTS.encode("utf-8", "surrogateescape") + b"\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]  # no temporary left
    HostsFile(tmp_path / "new", "lab").update({"a": "100.64.0.1"})  # no file yet: made
    assert entries_of((tmp_path / "new").read_text(), "lab")["a.lab"] == "100.64.0.1"

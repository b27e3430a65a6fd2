"""Dialogs (RFC 3261 §12), sans-I/O: creation on both sides, route sets, request targets
for loose and strict routing (§12.2.1.1, §16.12.1.2), CSeq handling, target refresh."""

from __future__ import annotations

import pytest

from sipmesh.sip.dialog import Dialog, DialogState, dialog_id_of_request
from sipmesh.sip.headers import parse_address
from sipmesh.sip.message import Request, Response, make_response, parse_message
from sipmesh.sip.uri import parse_uri

CALLER_CONTACT = "sip:caller@u1.example.com"
CALLEE_CONTACT = "sip:callee@u2.domain.com"
# §16.12.1.2: four proxies record-route; the third (p3.middle.com) is a strict router.
RECORD_ROUTE = ["<sip:p4.domain.com;lr>", "<sip:p3.middle.com>", "<sip:p2.domain.com;lr>",
                "<sip:p1.example.com;lr>"]


def message(text: str) -> Request | Response:
    return parse_message(text.replace("\n", "\r\n").encode())


def invite(*, record_route: list[str] = (), contact: str | None = CALLER_CONTACT,
           uri: str = "sip:callee@domain.com", cseq: int = 314159) -> Request:
    lines = [f"INVITE {uri} SIP/2.0",
             "Via: SIP/2.0/UDP p4.domain.com;branch=z9hG4bKp4",
             "Via: SIP/2.0/UDP u1.example.com;branch=z9hG4bKu1",
             "Max-Forwards: 66",
             "From: Caller <sip:caller@example.com>;tag=fromtag",
             "To: Callee <sip:callee@domain.com>",
             "Call-ID: dialog-test@u1.example.com",
             f"CSeq: {cseq} INVITE"]
    lines += [f"Record-Route: {rr}" for rr in record_route]
    if contact is not None:
        lines.append(f"Contact: <{contact}>")
    request = message("\n".join(lines) + "\nContent-Length: 0\n\n")
    assert isinstance(request, Request)
    return request


def answer(request: Request, status: int = 200, *, tag: str | None = "totag",
           contact: str | None = CALLEE_CONTACT) -> Response:
    response = make_response(request, status, to_tag=tag)  # copies Record-Route for 1xx/2xx
    if contact is not None:
        response.headers.add("Contact", f"<{contact}>")
    return response


def uris(addresses) -> list[str]:
    return [str(a.uri) for a in addresses]


# -- creation ----------------------------------------------------------------------------


def test_uac_dialog_from_2xx():
    request = invite(record_route=RECORD_ROUTE)
    dialog = Dialog.from_uac(request, answer(request))
    assert dialog.id == ("dialog-test@u1.example.com", "fromtag", "totag")
    assert dialog.state is DialogState.CONFIRMED
    assert str(dialog.remote_target) == CALLEE_CONTACT
    assert dialog.local_seq == 314159 and dialog.remote_seq is None
    assert str(dialog.local_uri.uri) == "sip:caller@example.com" and dialog.local_uri.tag is None
    assert str(dialog.remote_uri.uri) == "sip:callee@domain.com" and dialog.remote_uri.tag is None
    assert dialog.remote_uri.display_name == "Callee"
    # §12.1.2: the route set is the Record-Route of the response, reversed
    assert uris(dialog.route_set) == ["sip:p1.example.com;lr", "sip:p2.domain.com;lr",
                                      "sip:p3.middle.com", "sip:p4.domain.com;lr"]
    assert not dialog.secure


def test_uac_early_dialog_from_1xx_with_tag_and_none_without():
    request = invite()
    early = Dialog.from_uac(request, answer(request, 180))
    assert early.state is DialogState.EARLY
    with pytest.raises(ValueError):
        Dialog.from_uac(request, answer(request, 180, tag=None))


def test_uac_dialog_without_contact_targets_the_request_uri_and_sips_is_secure():
    request = invite(uri="sips:callee@domain.com")
    dialog = Dialog.from_uac(request, answer(request, contact=None))
    assert str(dialog.remote_target) == "sips:callee@domain.com"
    assert dialog.secure


def test_uas_dialog_from_invite():
    request = invite(record_route=RECORD_ROUTE)
    dialog = Dialog.from_uas(request, "uastag")
    assert dialog.id == ("dialog-test@u1.example.com", "uastag", "fromtag")
    assert dialog.state is DialogState.CONFIRMED
    assert str(dialog.remote_target) == CALLER_CONTACT
    assert dialog.remote_seq == 314159 and dialog.local_seq == 0
    assert str(dialog.local_uri.uri) == "sip:callee@domain.com" and dialog.local_uri.tag is None
    assert str(dialog.remote_uri.uri) == "sip:caller@example.com"
    # §12.1.1: the route set is the Record-Route of the request, in order
    assert uris(dialog.route_set) == ["sip:p4.domain.com;lr", "sip:p3.middle.com",
                                      "sip:p2.domain.com;lr", "sip:p1.example.com;lr"]


def test_uas_dialog_needs_a_contact():
    with pytest.raises(ValueError):
        Dialog.from_uas(invite(contact=None), "uastag")


def test_both_sides_agree_on_the_dialog_id_of_in_dialog_requests():
    request = invite(record_route=RECORD_ROUTE)
    uac = Dialog.from_uac(request, answer(request, tag="uastag"))
    uas = Dialog.from_uas(request, "uastag")
    assert dialog_id_of_request(uac.create_request("BYE")) == uas.id
    assert dialog_id_of_request(uas.create_request("BYE")) == uac.id
    assert dialog_id_of_request(request) is None  # no To tag: not in a dialog


# -- request targets: loose and strict routing -----------------------------------------


def test_16_12_1_2_callee_bye_with_a_strict_router_in_the_middle():
    """U2 -> P4 in §16.12.1.2: the first route is loose, so the Request-URI is the remote
    target and every route goes into Route, in order."""
    uas = Dialog.from_uas(invite(record_route=RECORD_ROUTE), "uastag")
    bye = uas.create_request("BYE")
    assert str(bye.uri) == CALLER_CONTACT
    assert uris(bye.addresses("Route")) == ["sip:p4.domain.com;lr", "sip:p3.middle.com",
                                            "sip:p2.domain.com;lr", "sip:p1.example.com;lr"]
    assert str(uas.next_hop()) == "sip:p4.domain.com;lr"


def test_16_12_1_2_caller_bye_uses_the_reversed_route_set():
    request = invite(record_route=RECORD_ROUTE)
    uac = Dialog.from_uac(request, answer(request))
    bye = uac.create_request("BYE")
    assert str(bye.uri) == CALLEE_CONTACT
    assert uris(bye.addresses("Route")) == ["sip:p1.example.com;lr", "sip:p2.domain.com;lr",
                                            "sip:p3.middle.com", "sip:p4.domain.com;lr"]
    assert str(uac.next_hop()) == "sip:p1.example.com;lr"


def bare_dialog(*routes: str) -> Dialog:
    return Dialog(call_id="c", local_tag="a", remote_tag="b",
                  local_uri=parse_address("<sip:me@here>"),
                  remote_uri=parse_address("<sip:you@there>"),
                  remote_target=parse_uri("sip:user@remoteua"),
                  route_set=[parse_address(route) for route in routes])


def test_12_2_1_1_strict_router_first():
    """The example of §12.2.1.1: the first route has no lr."""
    dialog = bare_dialog("<sip:proxy1>", "<sip:proxy2>", "<sip:proxy3;lr>", "<sip:proxy4>")
    request = dialog.create_request("BYE")
    assert str(request.uri) == "sip:proxy1"
    assert uris(request.addresses("Route")) == ["sip:proxy2", "sip:proxy3;lr", "sip:proxy4",
                                                "sip:user@remoteua"]
    assert str(dialog.next_hop()) == "sip:proxy1"


def test_strict_route_keeps_request_uri_parameters_but_drops_method_and_headers():
    dialog = bare_dialog("<sip:proxy1:5070;transport=tcp;maddr=192.0.2.1;method=INVITE?x=y>")
    uri, routes = dialog.request_target()
    assert str(uri) == "sip:proxy1:5070;transport=tcp;maddr=192.0.2.1"
    assert uris(routes) == ["sip:user@remoteua"]


def test_no_route_set_targets_the_remote_target_directly():
    request = invite()
    dialog = Dialog.from_uac(request, answer(request))
    bye = dialog.create_request("BYE")
    assert str(bye.uri) == CALLEE_CONTACT and bye.headers.get("Route") is None
    assert str(dialog.next_hop()) == CALLEE_CONTACT


# -- building requests, CSeq ---------------------------------------------------------


def test_in_dialog_request_headers_and_cseq_numbering():
    request = invite(cseq=7)
    dialog = Dialog.from_uac(request, answer(request))
    ack = dialog.create_request("ACK", cseq=7)
    assert ack.cseq == (7, "ACK") and dialog.local_seq == 7  # the ACK takes the INVITE's number
    options = dialog.create_request("OPTIONS", contact="<sip:caller@u1.example.com>")
    bye = dialog.create_request("BYE")
    assert options.cseq == (8, "OPTIONS") and bye.cseq == (9, "BYE")
    assert bye.from_.tag == "fromtag" and bye.to.tag == "totag"
    assert bye.call_id == "dialog-test@u1.example.com"
    assert bye.headers.get("Max-Forwards") == "70"
    assert bye.headers.get("Contact") is None
    assert str(options.contacts[0].uri) == "sip:caller@u1.example.com"
    assert bye.to.display_name == "Callee"


def test_uas_side_numbers_its_own_requests_from_one():
    dialog = Dialog.from_uas(invite(cseq=500), "uastag")
    assert dialog.create_request("BYE").cseq == (1, "BYE")


def in_dialog(method: str, cseq: int, *, contact: str | None = None) -> Request:
    lines = [f"{method} {CALLEE_CONTACT} SIP/2.0",
             "Via: SIP/2.0/UDP u1.example.com;branch=z9hG4bKx" + str(cseq) + method,
             "Max-Forwards: 70",
             "From: <sip:caller@example.com>;tag=fromtag",
             "To: <sip:callee@domain.com>;tag=uastag",
             "Call-ID: dialog-test@u1.example.com",
             f"CSeq: {cseq} {method}"]
    if contact:
        lines.append(f"Contact: <{contact}>")
    request = message("\n".join(lines) + "\nContent-Length: 0\n\n")
    assert isinstance(request, Request)
    return request


def test_remote_cseq_lower_is_out_of_order_higher_advances():
    dialog = Dialog.from_uas(invite(cseq=10), "uastag")
    assert not dialog.accept_remote_cseq(in_dialog("OPTIONS", 9))  # §12.2.2: 500
    assert dialog.remote_seq == 10
    assert dialog.accept_remote_cseq(in_dialog("OPTIONS", 10))  # not lower: accepted
    assert dialog.accept_remote_cseq(in_dialog("INFO", 15))  # gaps are allowed
    assert dialog.remote_seq == 15
    assert dialog.accept_remote_cseq(in_dialog("ACK", 10))  # ACK and CANCEL carry old numbers
    assert dialog.accept_remote_cseq(in_dialog("CANCEL", 3))
    assert dialog.remote_seq == 15
    assert not dialog.accept_remote_cseq(in_dialog("BYE", 14))


def test_first_remote_cseq_on_the_uac_side_is_taken_as_is():
    request = invite()
    dialog = Dialog.from_uac(request, answer(request, tag="uastag"))
    assert dialog.remote_seq is None
    assert dialog.accept_remote_cseq(in_dialog("BYE", 1))
    assert dialog.remote_seq == 1


# -- target refresh -------------------------------------------------------------------


def test_target_refresh_by_reinvite_and_by_its_2xx():
    uas = Dialog.from_uas(invite(record_route=RECORD_ROUTE), "uastag")
    reinvite = in_dialog("INVITE", 314160, contact="sip:caller@new.example.com")
    uas.update_target(reinvite)
    assert str(uas.remote_target) == "sip:caller@new.example.com"
    assert uris(uas.route_set)[0] == "sip:p4.domain.com;lr"  # the route set never changes
    uas.update_target(in_dialog("INVITE", 314161))  # no Contact: the target stays
    assert str(uas.remote_target) == "sip:caller@new.example.com"

    request = invite()
    uac = Dialog.from_uac(request, answer(request))
    reinvite = uac.create_request("INVITE", contact=f"<{CALLER_CONTACT}>")
    uac.update_target(answer(reinvite, contact="sip:callee@moved.domain.com"))
    assert str(uac.remote_target) == "sip:callee@moved.domain.com"
    assert str(uac.create_request("BYE").uri) == "sip:callee@moved.domain.com"

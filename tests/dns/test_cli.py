"""`form dns verify`'s pieces, without a node (the node test runs the whole command)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from formation.cli.dns import _dns_server, _served_note, verify_report
from formation.cli.output import CliError
from formation.dns.names import owner_label

ALICE = "0x" + "a1" * 20


def test_dns_server_option():
    assert _dns_server(None, "http://10.1.2.3:3004") == ("10.1.2.3", 5453)
    assert _dns_server("127.0.0.1:53", "http://x:1") == ("127.0.0.1", 53)
    assert _dns_server("[::1]:5353", "http://x:1") == ("::1", 5353)
    assert _dns_server("resolver.lan", "http://x:1") == ("resolver.lan", 5453)
    with pytest.raises(CliError):
        _dns_server("host:port", "http://x:1")


def _txt(*strings):
    r = dns.message.make_response(dns.message.make_query("_formation.app.example", "TXT"))
    if strings:
        r.answer.append(dns.rrset.from_text_list("_formation.app.example.", 60, "IN", "TXT", [f'"{s}"' for s in strings]))
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r


def _a(authoritative: bool):
    r = dns.message.make_response(dns.message.make_query("app.example", "A"))
    r.answer.append(dns.rrset.from_text("app.example.", 60, "IN", "A", "10.201.1.5"))
    if authoritative:
        r.flags |= dns.flags.AA
    return r


def test_verify_report():
    rec = [{"record_id": "r1", "domain": "app.example"}]
    ok, rep = verify_report("app.example", ALICE, rec, ("127.0.0.1", 5453), _txt(), _a(False))
    assert not ok and not rep["proven"] and rep["hint"].endswith(f'_formation.app.example. TXT "{ALICE}"')
    ok, rep = verify_report("app.example", ALICE, rec, ("127.0.0.1", 5453), _txt(ALICE.upper().replace("0X", "0x")),
                            _a(False))
    assert not ok and rep["proven"] and not rep["served"] and "checks again" in rep["hint"]
    ok, rep = verify_report("app.example", ALICE, rec, ("127.0.0.1", 5453), _txt(ALICE), _a(True))
    assert ok and rep["answer"] == ["10.201.1.5"] and rep["hint"] is None
    ok, rep = verify_report("app.example", ALICE, [], ("127.0.0.1", 5453), _txt(ALICE), _a(True))
    assert not ok and "has no DNS record" in rep["hint"]
    ok, rep = verify_report("app.example", ALICE, rec, ("127.0.0.1", 5453), None, None)
    assert not ok and "no answer" in rep["txt"]


def test_add_says_when_a_name_will_not_be_served(capsys):
    _served_note("app.fog", ALICE)
    assert "only names in your own space" in capsys.readouterr().err
    _served_note(f"api.{owner_label(ALICE)}.fog", ALICE)
    _served_note(f"api.0x{'a1' * 20}.fog", ALICE)
    assert capsys.readouterr().err == ""
    _served_note("app.example.com", ALICE)
    assert f'_formation.app.example.com. "{ALICE}"' in capsys.readouterr().err

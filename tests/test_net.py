"""core.net: one reading of HOST:PORT and Host headers for every part of easgate."""

import pytest

from easgate.core.net import host_of, parse_listen, split_hostport


@pytest.mark.parametrize("header, host", [
    ("mail.example.test", "mail.example.test"), ("MAIL.Example.TEST:443", "mail.example.test"),
    ("[2001:db8::1]:443", "2001:db8::1"), ("[2001:DB8::1]", "2001:db8::1"), ("2001:db8::1", "2001:db8::1"),
    ("127.0.0.1:8443", "127.0.0.1"),
])
def test_host_of_agrees_on_ipv6_and_ports(header, host):
    assert host_of(header) == host


@pytest.mark.parametrize("value, want", [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)), ("[::1]:0", ("::1", 0)), (":9090", ("127.0.0.1", 9090)),
    ("9090", ("127.0.0.1", 9090)), ("0.0.0.0:443", ("0.0.0.0", 443)),
])
def test_parse_listen(value, want):
    assert parse_listen(value) == want


@pytest.mark.parametrize("value, why", [
    ("127.0.0.l:8443", "not an IP address"), ("foo", "not HOST:PORT"), ("127.0.0.1:99999", "no valid port"),
    ("127.0.0.1:", "no valid port"), ("[::1:80", "unclosed"), ("notaport", "not HOST:PORT"),
])
def test_parse_listen_says_what_is_wrong(value, why):
    with pytest.raises(ValueError, match=why):
        parse_listen(value)


def test_split_hostport_keeps_the_port_text():
    assert split_hostport("[::1]:x") == ("::1", "x")

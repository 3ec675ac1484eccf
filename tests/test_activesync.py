"""Tests for easgate.activesync: one ActiveSync request -> one Identity.

Binary (base64) queries are built here by hand with struct from the layout of [MS-ASHTTP]
2.2.1.1.1.1, not only through the module's encoder, so an encoder bug cannot hide a decoder bug.
"""

from __future__ import annotations

import base64
import random
import struct

import pytest
from mitmproxy.http import Headers

from easgate.authz.identity import (
    COMMAND_CODES,
    PARAMETER_TAGS,
    BinaryQuery,
    Identity,
    decode_binary_query,
    encode_binary_query,
    parse_basic_auth,
    parse_request,
)

HOST = "mail.example.test"
EAS = "/Microsoft-Server-ActiveSync"
IP = "198.51.100.7"
UA_IPHONE = "Apple-iPhone14C2/2008.420"
UA_ANDROID = "Android-Mail/2023.01.01"
UA_OUTLOOK = "Outlook-iOS-Android/1.0"

# The spec's own example ([MS-ASHTTP] 2.2.1.1.1 and 2.2.1.1.1.1): equivalent to
# Cmd=Sync&DeviceId=v140Device&DeviceType=SmartPhone with protocol 14.0.
SPEC_B64 = "jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l"
GUID = bytes.fromhex("6f24cad599a5bf1a690246b8c68fae8d")


def basic(user: str, password: str = "Secr3t!") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def headers(*pairs: tuple[str, str | bytes]) -> Headers:
    return Headers([(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in pairs])


def raw_query(
    version: int = 141,
    cmd: int = 0,
    locale: int = 0x0409,
    devid: bytes = b"ApplF17XXXXX",
    policy: int | None = None,
    dtype: bytes = b"iPhone",
    params: bytes = b"",
) -> bytes:
    """The byte sequence of [MS-ASHTTP] 2.2.1.1.1.1, by hand."""
    out = struct.pack("<BBH", version, cmd, locale)
    out += struct.pack("B", len(devid)) + devid
    out += b"\x00" if policy is None else b"\x04" + struct.pack("<I", policy)
    out += struct.pack("B", len(dtype)) + dtype
    return out + params


def param(tag: int, value: bytes) -> bytes:
    return struct.pack("BB", tag, len(value)) + value


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def req(query: str | None = None, *hdrs: tuple[str, str | bytes], method: str = "POST") -> Identity:
    path = EAS if query is None else f"{EAS}?{query}"
    return parse_request(method, "https", HOST, path, headers(*hdrs), IP)


def plain(cmd="Sync", user="alice", devid="ApplF17XXXXX", dtype="iPhone", extra="") -> str:
    parts = []
    if cmd is not None:
        parts.append(f"Cmd={cmd}")
    if user is not None:
        parts.append(f"User={user}")
    if devid is not None:
        parts.append(f"DeviceId={devid}")
    if dtype is not None:
        parts.append(f"DeviceType={dtype}")
    q = "&".join(parts)
    return q + extra


# --------------------------------------------------------------------------------------------
# Spec tables
# --------------------------------------------------------------------------------------------


def test_command_codes_match_spec_table():
    # [MS-ASHTTP] 2.2.1.1.1.1.2, revision 23.0: 5..8 unassigned, 23 = Find.
    assert COMMAND_CODES == {
        0: "Sync", 1: "SendMail", 2: "SmartForward", 3: "SmartReply", 4: "GetAttachment",
        9: "FolderSync", 10: "FolderCreate", 11: "FolderDelete", 12: "FolderUpdate",
        13: "MoveItems", 14: "GetItemEstimate", 15: "MeetingResponse", 16: "Search",
        17: "Settings", 18: "Ping", 19: "ItemOperations", 20: "Provision",
        21: "ResolveRecipients", 22: "ValidateCert", 23: "Find",
    }


def test_parameter_tags_match_spec_table():
    # [MS-ASHTTP] 2.2.1.1.1.1.3: 2 and 5 unassigned.
    assert PARAMETER_TAGS == {
        0: "AttachmentName", 1: "CollectionId", 3: "ItemId", 4: "LongId",
        6: "Occurrence", 7: "Options", 8: "User",
    }


# --------------------------------------------------------------------------------------------
# Base64 form: decoding
# --------------------------------------------------------------------------------------------


def test_decode_spec_example():
    bq = decode_binary_query(base64.b64decode(SPEC_B64))
    assert bq == BinaryQuery(
        version="14.0", command="Sync", locale=1033, device_id=b"v140Device",
        policy_key=None, device_type="SmartPhone", params={},
    )


def test_encoder_reproduces_spec_example():
    assert encode_binary_query(
        command="Sync", device_id=b"v140Device", device_type="SmartPhone", version="14.0", locale=0x0409
    ) == SPEC_B64


def test_request_with_spec_example():
    ident = req(SPEC_B64, ("User-Agent", "ASOM"))
    assert ident == Identity(
        user=None, user_source="none", device_id="v140Device", device_id_binary=False,
        device_type="SmartPhone", command="Sync", protocol_version="14.0", policy_key=None,
        user_agent="ASOM", client_ip=IP, url=f"https://{HOST}{EAS}?{SPEC_B64}",
        query_form="base64", locale=1033, error=None,
    )


def test_binary_policy_key_and_locale_are_little_endian():
    raw = raw_query(cmd=18, locale=0x0407, policy=0x12345678)
    # the policy key's wire bytes, as put there by hand
    assert b"\x04\x78\x56\x34\x12" in raw
    ident = req(b64(raw), ("User-Agent", UA_OUTLOOK))
    assert ident.command == "Ping"
    assert ident.locale == 1031  # de-DE
    assert ident.policy_key == "305419896"
    assert ident.protocol_version == "14.1"
    assert ident.error is None


def test_binary_guid_device_id_is_lowercase_hex():
    ident = req(b64(raw_query(cmd=9, devid=GUID, dtype=b"WP8")))
    assert ident.device_id == "6f24cad599a5bf1a690246b8c68fae8d"
    assert ident.device_id_binary is True
    assert ident.command == "FolderSync"
    assert ident.device_type == "WP8"
    assert ident.error is None


def test_binary_user_parameter_and_other_parameters():
    params = (
        param(8, b"CONTOSO\\alice")
        + param(1, b"5")
        + param(3, b"5:12")
        + param(7, b"\x01")
    )
    raw = raw_query(version=161, cmd=3, policy=1, params=params)
    bq = decode_binary_query(raw)
    assert bq.command == "SmartReply"
    assert bq.version == "16.1"
    assert bq.policy_key == 1
    assert bq.params == {"User": "CONTOSO\\alice", "CollectionId": "5", "ItemId": "5:12", "Options": b"\x01"}
    ident = req(b64(raw))
    assert (ident.user, ident.user_source) == ("CONTOSO\\alice", "query")
    assert ident.error is None


def test_basic_user_wins_over_binary_user():
    raw = raw_query(params=param(8, b"mallory"))
    ident = req(b64(raw), ("Authorization", basic("alice@contoso.com")))
    assert (ident.user, ident.user_source) == ("alice@contoso.com", "basic")
    assert ident.error is None


def test_headers_win_over_binary_version_and_policy_key():
    raw = raw_query(version=140, policy=7)
    ident = req(b64(raw), ("MS-ASProtocolVersion", "14.1"), ("X-MS-PolicyKey", "3942919513"))
    assert ident.protocol_version == "14.1"
    assert ident.policy_key == "3942919513"
    assert ident.error is None


def test_encoder_decoder_round_trip():
    q = encode_binary_query(
        command="ItemOperations", device_id=GUID, device_type="Android", version=160,
        locale=0x040C, policy_key=0xFFFFFFFF, params=[("User", "bob@contoso.com"), ("Options", 2)],
    )
    bq = decode_binary_query(base64.b64decode(q))
    assert bq == BinaryQuery(
        version="16.0", command="ItemOperations", locale=0x040C, device_id=GUID,
        policy_key=4294967295, device_type="Android",
        params={"User": "bob@contoso.com", "Options": b"\x02"},
    )
    # and the encoder lays the bytes out as the spec does
    assert base64.b64decode(q) == raw_query(
        version=160, cmd=19, locale=0x040C, devid=GUID, policy=0xFFFFFFFF, dtype=b"Android",
        params=param(8, b"bob@contoso.com") + param(7, b"\x02"),
    )


def test_percent_encoded_base64_query():
    # padding and '+' '/' sent percent-encoded, as some clients do
    raw = raw_query(devid=b"\xfb\xff\xfe\x01", dtype=b"SP")  # base64 contains '+' and '/'
    text = b64(raw)
    assert "+" in text or "/" in text
    assert text.endswith("=")
    quoted = text.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    for q in (text, quoted):
        ident = req(q)
        assert ident.query_form == "base64"
        assert ident.device_id == "fbfffe01"
        assert ident.device_id_binary is True
        assert ident.error is None


def test_every_encodable_command_code_decodes():
    for code, name in COMMAND_CODES.items():
        ident = req(b64(raw_query(cmd=code)))
        assert (ident.command, ident.error) == (name, None)


# --------------------------------------------------------------------------------------------
# Base64 form: malformed input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", ["jAAJBAp2MTQw!!RGV2", "jAAJB", "====", "jAAJ%FFBA"])
def test_bad_base64(q):
    ident = req(q)
    assert ident.query_form == "base64"
    assert ident.error == "malformed base64 query"
    assert (ident.command, ident.device_id, ident.device_type, ident.locale) == (None, None, None, None)


def test_truncated_binary_query_header():
    ident = req(b64(b"\x8d\x00\x09"))
    assert ident.error == "truncated binary query"
    assert ident.command is None and ident.device_id is None


def test_truncated_after_device_id():
    raw = raw_query()[: 5 + 12]  # stops right after the device id
    ident = req(b64(raw))
    assert ident.error == "truncated binary query (no policy key length)"
    assert ident.device_id == "ApplF17XXXXX"  # what could be read is kept
    assert ident.device_type is None


def test_device_id_length_byte_past_end():
    raw = struct.pack("<BBHB", 141, 0, 0x0409, 12) + b"short"
    ident = req(b64(raw))
    assert ident.error == "DeviceId length byte past end of binary query"
    assert ident.device_id is None
    assert ident.command == "Sync"


def test_device_type_length_byte_past_end():
    raw = raw_query(dtype=b"")[:-1] + b"\x20iPhone"
    ident = req(b64(raw))
    assert ident.error == "DeviceType length byte past end of binary query"
    assert ident.device_type is None
    assert ident.device_id == "ApplF17XXXXX"


def test_policy_key_length_byte_past_end():
    raw = raw_query()[: 5 + 12] + b"\x04\x01\x02"
    ident = req(b64(raw))
    assert ident.error == "policy key length byte past end of binary query"
    assert ident.policy_key is None


def test_parameter_length_byte_past_end():
    raw = raw_query(params=b"\x08\x09alice")
    ident = req(b64(raw))
    assert ident.error == "User length byte past end of binary query"
    assert ident.user is None


def test_truncated_parameter_header():
    ident = req(b64(raw_query(params=b"\x08")))
    assert ident.error == "truncated binary query (parameter header)"


def test_device_id_length_over_16():
    ident = req(b64(raw_query(devid=b"A" * 17)))
    assert ident.error == "DeviceId length 17 over 16 in binary query"
    assert ident.device_id is None
    ident16 = req(b64(raw_query(devid=b"A" * 16)))
    assert (ident16.device_id, ident16.error) == ("A" * 16, None)


def test_device_id_length_zero():
    ident = req(b64(raw_query(devid=b"")))
    assert ident.error == "DeviceId length 0 in binary query"
    assert ident.device_id is None


def test_policy_key_length_not_0_or_4():
    raw = raw_query()[: 5 + 12] + b"\x03\x01\x02\x03\x06iPhone"
    ident = req(b64(raw))
    assert ident.error == "policy key length 3 in binary query (must be 0 or 4)"


@pytest.mark.parametrize("code", [5, 6, 7, 8, 24, 255])
def test_unknown_command_code(code):
    ident = req(b64(raw_query(cmd=code)))
    assert ident.error == f"unknown command code {code}"
    assert ident.command is None
    assert ident.device_id == "ApplF17XXXXX"  # the rest was still read


@pytest.mark.parametrize("version", [25, 120, 0, 255])
def test_unsupported_binary_protocol_version(version):
    ident = req(b64(raw_query(version=version)))
    assert ident.error == f"unsupported protocol version {version} in binary query"


def test_unknown_parameter_tag():
    ident = req(b64(raw_query(params=param(2, b"Inbox"))))
    assert ident.error == "unknown parameter tag 2 in binary query"


def test_non_utf8_binary_device_type():
    ident = req(b64(raw_query(dtype=b"iPh\xffne")))
    assert ident.error == "non-UTF-8 bytes in DeviceType"
    assert ident.device_type is None
    assert ident.device_id == "ApplF17XXXXX"


def test_non_utf8_binary_user():
    ident = req(b64(raw_query(params=param(8, b"al\xe9ce"))))
    assert ident.error == "non-UTF-8 bytes in User"
    assert ident.user is None and ident.user_source == "none"


def test_conflicting_binary_parameters():
    ident = req(b64(raw_query(params=param(8, b"alice") + param(8, b"bob"))))
    assert ident.error == "conflicting User parameters in binary query"
    assert ident.user == "alice"


def test_bad_options_length():
    ident = req(b64(raw_query(cmd=1, params=param(7, b"\x01\x00"))))
    assert ident.error == "Options parameter of 2 bytes (must be 1)"


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"\x8d\x00", "truncated binary query"),
        (raw_query(cmd=7), "unknown command code 7"),
        (raw_query(devid=b"B" * 20), "DeviceId length 20 over 16 in binary query"),
        (raw_query(params=b"\x09\x00"), "unknown parameter tag 9 in binary query"),
    ],
)
def test_decode_binary_query_raises_with_reason(raw, reason):
    with pytest.raises(ValueError) as exc:
        decode_binary_query(raw)
    assert str(exc.value) == reason


def test_every_prefix_of_a_binary_query_is_an_error():
    head = raw_query(cmd=20, policy=99)
    raw = head + param(8, b"alice")
    for n in range(len(raw)):
        ident = req(b64(raw[:n])) if n else req("")
        if n == len(head):  # the fixed part alone is a complete query without parameters
            assert (ident.error, ident.user) == (None, None)
        else:
            assert ident.error is not None, n
    assert (req(b64(raw)).error, req(b64(raw)).user) == (None, "alice")


# --------------------------------------------------------------------------------------------
# Plain form
# --------------------------------------------------------------------------------------------


def test_plain_iphone_request():
    q = plain(user="alice%40contoso.com", devid="ApplF17XXXXX", dtype="iPhone")
    ident = req(
        q,
        ("Authorization", basic("alice@contoso.com")),
        ("MS-ASProtocolVersion", "16.1"),
        ("X-MS-PolicyKey", "2034202722"),
        ("User-Agent", UA_IPHONE),
    )
    assert ident == Identity(
        user="alice@contoso.com", user_source="basic", device_id="ApplF17XXXXX",
        device_id_binary=False, device_type="iPhone", command="Sync", protocol_version="16.1",
        policy_key="2034202722", user_agent=UA_IPHONE, client_ip=IP,
        url=f"https://{HOST}{EAS}?{q}", query_form="plain", locale=None, error=None,
    )


def test_plain_names_case_insensitive_and_command_canonical():
    q = "cmd=ping&user=CONTOSO%5Cbob&deviceid=androidc1234567890&DEVICETYPE=Android"
    ident = req(q, ("User-Agent", UA_ANDROID), ("MS-ASProtocolVersion", "14.1"))
    assert ident.command == "Ping"
    assert (ident.user, ident.user_source) == ("CONTOSO\\bob", "query")
    assert ident.device_id == "androidc1234567890"
    assert ident.device_type == "Android"
    assert ident.user_agent == UA_ANDROID
    assert ident.error is None


def test_plain_legacy_command_and_extra_parameters():
    q = plain(cmd="SmartReply", extra="&ItemId=5%3A12&CollectionId=5&SaveInSent=T")
    assert req(q).error is None
    assert req(plain(cmd="GetHierarchy")).command == "GetHierarchy"


def test_plain_unknown_command():
    ident = req(plain(cmd="Exploit"))
    assert ident.command == "Exploit"
    assert ident.error == "unknown command 'Exploit'"


def test_plain_user_with_spaces_is_denied_not_stripped():
    # MS-ASHTTP 2.2.1.1.1.2: user-name = 1*VCHAR; the upstream would read the spaces too
    ident = req(plain(user="+%20alice+smith%09"))
    assert ident.user is None
    assert "is not printable ASCII without spaces (MS-ASHTTP 2.2.1.1.1.2)" in ident.error


@pytest.mark.parametrize("devid", ["Appl%01%02", "A%20BCD", "A+BCD", "A%00BCD", "Appl%C3%A9", "Appl-1", "Appl,1",
                                   "Appl_1", "Appl.1"])
def test_plain_device_id_outside_the_spec_alphabet_is_denied_never_re_encoded(devid):
    # MS-ASHTTP 2.2.1.1.1.2: device-id = 1*32(ALPHA / DIGIT). Today's main decided `A%20BCD` as the
    # hex 4120424344 while Exchange reads `A BCD`.
    ident = req(plain(devid=devid))
    assert ident.device_id is None
    assert "is not 1-32 ASCII letters and digits (MS-ASHTTP 2.2.1.1.1.2)" in ident.error
    assert "4120424344" not in ident.error


def test_plain_device_id_twice_different():
    ident = req(plain(devid="ApplAAAA", extra="&DeviceId=ApplBBBB"))
    assert ident.error == "conflicting DeviceId parameters"
    assert ident.device_id is None


def test_plain_device_id_twice_different_case_of_name():
    ident = req(plain(devid="ApplAAAA", extra="&deviceid=ApplBBBB"))
    assert ident.error == "conflicting DeviceId parameters"
    assert ident.device_id is None


def test_plain_device_id_twice_even_the_same_is_an_error():
    # ASP.NET would read "ApplAAAA,ApplAAAA": not the DeviceId the gateway would decide on
    ident = req(plain(devid="ApplAAAA", extra="&DeviceId=ApplAAAA"))
    assert ident.error == "repeated DeviceId parameter" and ident.device_id is None


def test_percent_u_escapes_are_refused():
    ident = req(plain(devid="ApplAAAA", extra="&User=%u0061lice"))
    assert ident.error == "%u escape in query"


def test_plain_user_twice_different():
    ident = req(plain(user="alice", extra="&User=bob"))
    assert ident.error == "conflicting User parameters"
    assert ident.user is None


def test_missing_device_id():
    ident = req(plain(devid=None), ("User-Agent", UA_IPHONE))
    assert ident.error == "DeviceId missing"
    assert ident.device_id is None
    assert ident.command == "Sync"


def test_blank_device_id_is_missing():
    assert req(plain(devid="")).error == "DeviceId missing"


def test_post_without_query():
    ident = req(None, ("Authorization", basic("alice")))
    assert ident.query_form == "empty"
    assert ident.error == "Cmd missing; DeviceId missing"
    assert ident.user == "alice"


def test_plain_without_cmd():
    assert req(plain(cmd=None)).error == "Cmd missing"


def test_non_utf8_plain_device_type():
    ident = req(plain(dtype="iPh%FFne"))
    assert ident.error == "non-UTF-8 bytes in DeviceType parameter"
    assert ident.device_type is None
    assert ident.device_id == "ApplF17XXXXX"
    assert ident.command == "Sync"


def test_non_utf8_plain_user():
    ident = req(plain(user="al%E9ce"))
    assert ident.error == "non-UTF-8 bytes in User parameter"
    assert ident.user is None


def test_non_utf8_plain_device_id():
    ident = req(plain(devid="Appl%C3%28"))
    assert ident.error == "non-UTF-8 bytes in DeviceId parameter"
    assert ident.device_id is None


def test_non_utf8_other_plain_value():
    ident = req(plain(extra="&AttachmentName=%FF"))
    assert ident.error == "non-UTF-8 bytes in query"
    assert ident.device_id == "ApplF17XXXXX"


def test_raw_non_utf8_bytes_in_path_from_mitmproxy():
    # mitmproxy decodes the request target with surrogateescape: raw 0xFF arrives as U+DCFF
    from mitmproxy.http import Request

    r = Request.make("POST", f"https://{HOST}{EAS}")
    r.data.path = b"/Microsoft-Server-ActiveSync?Cmd=Sync&User=al\xffce&DeviceId=ApplF17X&DeviceType=iPhone"
    ident = parse_request(r.method, r.scheme, r.host, r.path, r.headers, IP)
    assert ident.error == "non-UTF-8 bytes in User parameter"
    assert ident.user is None
    assert ident.device_id == "ApplF17X"


def test_oversized_device_id():
    ident = req(plain(devid="A" * 33))
    assert ident.error.startswith("DeviceId 'AAAA") and "is not 1-32 ASCII letters and digits" in ident.error
    assert ident.device_id is None
    assert req(plain(devid="A" * 32)).device_id == "A" * 32


def test_oversized_user():
    ident = req(plain(user="u" * 1025))
    assert ident.error == "user in User parameter too long (1025 chars)"
    assert ident.user is None


def test_oversized_basic_user():
    ident = req(plain(), ("Authorization", basic("u" * 1025)))
    assert ident.error == "user in Basic credentials too long (1025 chars)"
    assert ident.user is None


def test_whole_query_over_8k():
    q = plain(extra="&Pad=" + "x" * 8200)
    ident = req(q)
    assert ident.error == f"query too long ({len(q)} chars)"
    assert (ident.command, ident.device_id, ident.user) == (None, None, None)
    assert ident.query_form == "plain"
    b = req("A" * 8196)
    assert b.error == "query too long (8196 chars)"
    assert b.query_form == "base64"


def test_too_many_parameters():
    q = plain(extra="".join(f"&p{i}=1" for i in range(70)))
    ident = req(q)
    assert ident.error == "more than 64 query parameters"


def test_user_param_disagreeing_with_basic_is_not_an_error():
    ident = req(plain(user="mallory"), ("Authorization", basic("CONTOSO\\alice")))
    assert (ident.user, ident.user_source, ident.error) == ("CONTOSO\\alice", "basic", None)


def test_several_errors_are_joined_on_one_line():
    ident = req(plain(devid=None, dtype="%FF"), ("Authorization", "Basic !!!"))
    assert ident.error == "non-UTF-8 bytes in DeviceType parameter; Basic credentials are not base64; DeviceId missing"
    assert "\n" not in ident.error


# --------------------------------------------------------------------------------------------
# OPTIONS
# --------------------------------------------------------------------------------------------


def test_options_without_query_is_well_formed():
    ident = req(None, ("User-Agent", UA_OUTLOOK), method="OPTIONS")
    assert ident.error is None
    assert (ident.command, ident.device_id, ident.user, ident.query_form) == (None, None, None, "empty")
    assert ident.url == f"https://{HOST}{EAS}"
    assert ident.user_agent == UA_OUTLOOK


def test_options_with_identity_query():
    ident = req(plain(cmd=None), ("Authorization", basic("alice")), method="OPTIONS")
    assert ident.error is None
    assert (ident.command, ident.device_id, ident.user) == (None, "ApplF17XXXXX", "alice")


def test_options_with_command_but_no_device_id():
    assert req(plain(devid=None), method="OPTIONS").error == "DeviceId missing"


# --------------------------------------------------------------------------------------------
# Authorization: Basic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user,password",
    [
        ("CONTOSO\\alice", "pw"),
        ("alice@contoso.com", "pw"),
        ("alice", "pa:ss:word"),
        ("bjorn@contoso.com", "ü:"),
        ("alice", ""),
    ],
)
def test_basic_forms(user, password):
    assert parse_basic_auth([basic(user, password)]) == (user, None)


def test_basic_spec_example():
    # [MS-ASHTTP] 2.2.1.1.2.2's example header; its text says "fakename", the bytes say fakeuser
    assert parse_basic_auth(["Basic ZmFrZXVzZXI6eCRwSUFLOUBwOSE="]) == ("fakeuser", None)


def test_basic_scheme_case_and_whitespace():
    token = base64.b64encode(b"alice:pw").decode()
    assert parse_basic_auth([f"  bAsIc   {token} "]) == ("alice", None)


@pytest.mark.parametrize("raw", [b"  alice  :pw", "bjørn@contoso.com:pw".encode(), b"alice smith:pw"])
def test_basic_user_outside_vchar_is_denied_never_stripped(raw):
    # the upstream reads the Basic user as sent (IIS in its own code page): no second reading
    user, err = parse_basic_auth(["Basic " + base64.b64encode(raw).decode()])
    assert user is None and "is not printable ASCII without spaces (MS-ASHTTP 2.2.1.1.1.2)" in err


def test_basic_absent_or_other_scheme():
    assert parse_basic_auth([]) == (None, None)
    assert parse_basic_auth(["Bearer eyJ0eXAiOiJKV1QifQ"]) == (None, None)
    assert parse_basic_auth(["Negotiate TlRMTVNTUAAB"]) == (None, None)


@pytest.mark.parametrize(
    "values,reason",
    [
        (["Basic !!!not-base64"], "Basic credentials are not base64"),
        (["Basic " + base64.b64encode(b"alicepw").decode()], "no ':' in Basic credentials"),
        (["Basic " + base64.b64encode(b":pw").decode()], "empty user in Basic credentials"),
        (["Basic " + base64.b64encode(b"   :pw").decode()],
         "user in Basic credentials '   ' is not printable ASCII without spaces (MS-ASHTTP 2.2.1.1.1.2)"),
        (["Basic " + base64.b64encode(b"al\xe9ce:pw").decode()], "non-UTF-8 user in Basic credentials"),
        (["Basic " + base64.b64encode(b"ali\x00ce:pw").decode()],
         "user in Basic credentials 'ali\\x00ce' is not printable ASCII without spaces (MS-ASHTTP 2.2.1.1.1.2)"),
        (["Basic"], "empty Basic credentials"),
        ([basic("alice"), basic("bob")], "conflicting Authorization headers"),
        ([basic("alice"), "Bearer abc"], "conflicting Authorization headers"),
    ],
)
def test_bad_basic(values, reason):
    assert parse_basic_auth(values) == (None, reason)


def test_repeated_identical_basic_is_fine():
    assert parse_basic_auth([basic("alice"), basic("alice")]) == ("alice", None)


def test_bad_basic_in_request_leaves_user_unknown():
    ident = req(plain(user="alice"), ("Authorization", "Basic " + base64.b64encode(b"nocolon").decode()))
    assert ident.error == "no ':' in Basic credentials"
    assert (ident.user, ident.user_source) == (None, "none")


def test_disagreeing_authorization_headers_in_request():
    ident = req(plain(), ("Authorization", basic("alice")), ("authorization", basic("bob")))
    assert ident.error == "conflicting Authorization headers"
    assert ident.user is None


# --------------------------------------------------------------------------------------------
# Other headers
# --------------------------------------------------------------------------------------------


def test_unsupported_protocol_version_header():
    ident = req(plain(), ("MS-ASProtocolVersion", "99.9"))
    assert ident.error == "unsupported MS-ASProtocolVersion '99.9'"
    assert ident.protocol_version == "99.9"


def test_conflicting_protocol_version_headers():
    ident = req(plain(), ("MS-ASProtocolVersion", "14.1"), ("MS-ASProtocolVersion", "16.1"))
    assert ident.error == "conflicting MS-ASProtocolVersion headers"
    assert ident.protocol_version is None


def test_non_utf8_user_agent():
    ident = req(plain(), ("User-Agent", b"Apple-iPhone\xff"))
    assert ident.error == "non-UTF-8 bytes in User-Agent"
    assert ident.user_agent is None


def test_any_object_with_get_all_works():
    class H:
        def __init__(self, d):
            self.d = {k.lower(): v for k, v in d.items()}

        def get_all(self, name):
            return self.d.get(name.lower(), [])

    ident = parse_request(
        "POST", "https", HOST, f"{EAS}?{plain()}",
        H({"User-Agent": [UA_OUTLOOK], "Authorization": [basic("alice")]}), IP,
    )
    assert (ident.user, ident.user_agent, ident.error) == ("alice", UA_OUTLOOK, None)


# --------------------------------------------------------------------------------------------
# URL, robustness
# --------------------------------------------------------------------------------------------


def test_url_forms():
    q = plain()
    assert parse_request("POST", "https", HOST, f"{EAS}?{q}", Headers(), IP).url == f"https://{HOST}{EAS}?{q}"
    absolute = f"http://{HOST}{EAS}?{q}"
    assert parse_request("POST", "http", HOST, absolute, Headers(), IP).url == absolute
    assert parse_request("POST", "https", "2001:db8::1", f"{EAS}?{q}", Headers(), IP).url == f"https://[2001:db8::1]{EAS}?{q}"


def test_never_raises_on_garbage():
    rng = random.Random(1234)
    alphabet = "ABCxyz019+/=%&?;#\\\x00\udcff é"
    for _ in range(2000):
        q = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        ident = parse_request("POST", "https", HOST, f"{EAS}?{q}", Headers(), IP)
        assert isinstance(ident, Identity)
    for _ in range(2000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        ident = parse_request("POST", "https", HOST, f"{EAS}?{b64(raw)}", Headers(), IP)
        assert isinstance(ident, Identity)
    # broken headers object: still an Identity, with an error
    ident = parse_request("POST", "https", HOST, f"{EAS}?{plain()}", object(), IP)
    assert ident.error == "unparseable request (AttributeError)"


def test_encoder_rejects_what_the_layout_cannot_carry():
    with pytest.raises(ValueError):
        encode_binary_query(command="GetHierarchy", device_id=b"x")
    with pytest.raises(ValueError):
        encode_binary_query(command=5, device_id=b"x")
    with pytest.raises(ValueError):
        encode_binary_query(command="Sync", device_id=b"x" * 17)
    with pytest.raises(ValueError):
        encode_binary_query(command="Sync", device_id=b"x", version="12.0")
    with pytest.raises(ValueError):
        encode_binary_query(command="Sync", device_id=b"x", params={"ParentId": "1"})
    with pytest.raises(ValueError):
        encode_binary_query(command="Sync", device_id=b"x", policy_key=2**32)

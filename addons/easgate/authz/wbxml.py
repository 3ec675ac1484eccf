"""ActiveSync WBXML ([MS-ASWBXML]): an encoder for the documents easgate builds itself.

The captures' request bodies (``tools/capture.py``) and the gateway's own ActiveSync deny answers
(``authz/eas_deny.py``) are built with `wbxml`. The token tables are transcribed from [MS-ASWBXML]
2.1.2.1 for the tags easgate uses; the tests decode every document again with mitmproxy's WBXML
decoder (``mitmproxy.contrib.wbxml``, independent tables).
"""

from __future__ import annotations

__all__ = ["CODE_PAGES", "E", "Element", "wbxml"]

SWITCH_PAGE, END, STR_I, OPAQUE = 0x00, 0x01, 0x03, 0xC3
WITH_CONTENT = 0x40
HEADER = bytes([0x03, 0x01, 0x6A, 0x00])  # WBXML 1.3, unknown public id, UTF-8, no string table

#: code page -> (namespace, {tag: token}); [MS-ASWBXML] 2.1.2.1.x
CODE_PAGES: dict[int, tuple[str, dict[str, int]]] = {
    0: ("AirSync", {
        "Sync": 0x05, "Responses": 0x06, "Add": 0x07, "Change": 0x08, "Delete": 0x09, "Fetch": 0x0A,
        "SyncKey": 0x0B, "ClientId": 0x0C, "ServerId": 0x0D, "Status": 0x0E, "Collection": 0x0F,
        "Class": 0x10, "CollectionId": 0x12, "GetChanges": 0x13, "MoreAvailable": 0x14,
        "WindowSize": 0x15, "Commands": 0x16, "Options": 0x17, "FilterType": 0x18,
        "Collections": 0x1C, "ApplicationData": 0x1D, "DeletesAsMoves": 0x1E, "MIMESupport": 0x22,
    }),
    2: ("Email", {"Subject": 0x14, "Read": 0x15, "To": 0x16, "From": 0x18, "DateReceived": 0x0F}),
    5: ("Move", {"MoveItems": 0x05, "Response": 0x0A, "Status": 0x0B}),
    6: ("ItemEstimate", {"GetItemEstimate": 0x05, "Response": 0x0D, "Status": 0x0E}),
    7: ("FolderHierarchy", {
        "DisplayName": 0x07, "ServerId": 0x08, "ParentId": 0x09, "Type": 0x0A, "Status": 0x0C,
        "Changes": 0x0E, "Add": 0x0F, "SyncKey": 0x12, "FolderCreate": 0x13, "FolderDelete": 0x14,
        "FolderUpdate": 0x15, "FolderSync": 0x16, "Count": 0x17,
    }),
    8: ("MeetingResponse", {"MeetingResponse": 0x07, "Result": 0x0A, "Status": 0x0B}),
    10: ("ResolveRecipients", {"ResolveRecipients": 0x05, "Response": 0x06, "Status": 0x07}),
    11: ("ValidateCert", {"ValidateCert": 0x05, "Status": 0x0A}),
    13: ("Ping", {
        "Ping": 0x05, "Status": 0x07, "HeartbeatInterval": 0x08, "Folders": 0x09, "Folder": 0x0A,
        "Id": 0x0B, "Class": 0x0C, "MaxFolders": 0x0D,
    }),
    14: ("Provision", {
        "Provision": 0x05, "Policies": 0x06, "Policy": 0x07, "PolicyType": 0x08, "PolicyKey": 0x09,
        "Data": 0x0A, "Status": 0x0B, "EASProvisionDoc": 0x0D, "DevicePasswordEnabled": 0x0E,
        "MinDevicePasswordLength": 0x14, "MaxInactivityTimeDeviceLock": 0x15,
        "MaxDevicePasswordFailedAttempts": 0x16, "AllowSimpleDevicePassword": 0x18,
        "RequireDeviceEncryption": 0x1D,
    }),
    15: ("Search", {"Search": 0x05, "Status": 0x0C}),
    17: ("AirSyncBase", {"BodyPreference": 0x05, "Type": 0x06, "TruncationSize": 0x07, "FileReference": 0x11}),
    18: ("Settings", {
        "Settings": 0x05, "Status": 0x06, "Set": 0x08, "DeviceInformation": 0x16, "Model": 0x17, "IMEI": 0x18,
        "FriendlyName": 0x19, "OS": 0x1A, "OSLanguage": 0x1B, "PhoneNumber": 0x1C,
        "UserAgent": 0x20, "EnableOutboundSMS": 0x21, "MobileOperator": 0x22,
    }),
    20: ("ItemOperations", {
        "ItemOperations": 0x05, "Fetch": 0x06, "Store": 0x07, "Options": 0x08, "Range": 0x09,
        "Total": 0x0A, "Properties": 0x0B, "Data": 0x0C, "Status": 0x0D, "Response": 0x0E,
        "Version": 0x0F, "Schema": 0x10, "Part": 0x11, "EmptyFolderContents": 0x12,
        "DeleteSubFolders": 0x13, "UserName": 0x14, "Password": 0x15, "Move": 0x16,
        "DstFldId": 0x17, "ConversationId": 0x18, "MoveAlways": 0x19,
    }),
    21: ("ComposeMail", {
        "SendMail": 0x05, "SmartForward": 0x06, "SmartReply": 0x07, "SaveInSentItems": 0x08,
        "Source": 0x0B, "FolderId": 0x0C, "ItemId": 0x0D, "LongId": 0x0E, "InstanceId": 0x0F,
        "Mime": 0x10, "ClientId": 0x11, "Status": 0x12,
    }),
}
_TOKENS: dict[str, tuple[int, int]] = {
    f"{ns}:{tag}": (page, token) for page, (ns, tags) in CODE_PAGES.items() for tag, token in tags.items()
}

#: An element: ("Namespace:Tag", child, child, ...); a child is an element, a str (inline
#: string) or bytes (opaque data, e.g. the MIME of SendMail).
Element = tuple


def E(tag: str, *children) -> Element:
    return (tag, *children)


def _mb_uint32(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def wbxml(root: Element) -> bytes:
    """Encode one element tree as an ActiveSync WBXML document."""
    out = bytearray(HEADER)
    page = [0]

    def emit(el: Element) -> None:
        tag, *children = el
        try:
            p, token = _TOKENS[tag]
        except KeyError:
            raise ValueError(f"no WBXML token for {tag!r} (add it to CODE_PAGES)") from None
        if p != page[0]:
            out.extend((SWITCH_PAGE, p))
            page[0] = p
        if not children:
            out.append(token)
            return
        out.append(token | WITH_CONTENT)
        for c in children:
            if isinstance(c, str):
                out.append(STR_I)
                out.extend(c.encode("utf-8") + b"\x00")
            elif isinstance(c, (bytes, bytearray)):
                out.append(OPAQUE)
                out.extend(_mb_uint32(len(c)) + bytes(c))
            else:
                emit(c)  # may switch the page; END is the same on every page
        out.append(END)

    emit(root)
    return bytes(out)

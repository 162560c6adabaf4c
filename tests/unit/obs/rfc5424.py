"""A strict RFC 5424 parser for the tests (the receiver's side of ``engine.obs.syslog``)."""

import re
from dataclasses import dataclass

HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    rb"(?P<msgid>\S+) "
)
BOM = "\ufeff".encode()


@dataclass
class Parsed:
    pri: int
    timestamp: str
    host: str
    app: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]]
    msg: str

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8


def parse(data: bytes) -> Parsed:
    match = HEADER.match(data)
    assert match, data[:100]
    rest = data[match.end() :]
    sd: dict[str, dict[str, str]] = {}
    if rest.startswith(b"-"):
        rest = rest[1:]
    else:
        while rest.startswith(b"["):
            sd_id, rest = _name(rest[1:])
            params: dict[str, str] = {}
            while rest.startswith(b" "):
                name, rest = _name(rest[1:])
                assert rest.startswith(b'="'), rest[:40]
                value, rest = _value(rest[2:])
                params[name] = value
            assert rest.startswith(b"]"), rest[:40]
            rest = rest[1:]
            sd[sd_id] = params
    msg = b""
    if rest:
        assert rest.startswith(b" "), rest[:40]
        msg = rest[1:]
        assert msg.startswith(BOM), msg[:10]
        msg = msg[len(BOM) :]
    return Parsed(
        pri=int(match["pri"]),
        timestamp=match["timestamp"].decode(),
        host=match["host"].decode(),
        app=match["app"].decode(),
        procid=match["procid"].decode(),
        msgid=match["msgid"].decode(),
        sd=sd,
        msg=msg.decode("utf-8"),
    )


def _name(data: bytes) -> tuple[str, bytes]:
    end = 0
    while end < len(data) and data[end] not in b'= ]"':
        assert 33 <= data[end] <= 126
        end += 1
    assert 1 <= end <= 32 or b"@" in data[:end], data[:40]
    return data[:end].decode("ascii"), data[end:]


def _value(data: bytes) -> tuple[str, bytes]:
    out = bytearray()
    i = 0
    while data[i : i + 1] != b'"':
        if data[i : i + 1] == b"\\" and data[i + 1 : i + 2] in (b'"', b"\\", b"]"):
            out += data[i + 1 : i + 2]
            i += 2
            continue
        assert data[i : i + 1] != b"]", "unescaped ] in a PARAM-VALUE"
        out += data[i : i + 1]
        i += 1
    return out.decode("utf-8"), data[i + 1 :]

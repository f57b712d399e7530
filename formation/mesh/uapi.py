"""WireGuard's cross-platform configuration protocol (UAPI), sans-IO: the text of a `set=1`
request and the parsing of a `get=1` answer. Keys are hex on this socket, base64 elsewhere.
https://www.wireguard.com/xplatform/ — one `key=value` per line, a blank line ends a request.

The kernel module has no such socket; there the same changes become `wg set` arguments
(`wg_set_args`) and `wg show IFACE dump` is read into the same Device (`parse_dump`), so formnet
sees one model whichever implementation runs the interface (backend.py).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field


class UapiError(Exception):
    pass


@dataclass(frozen=True)
class PeerConfig:
    """One peer as this interface should have it."""

    public_key: bytes
    endpoint: str | None = None  # "host:port"
    allowed_ips: tuple[str, ...] = ()
    keepalive: int = 25


@dataclass(frozen=True)
class PeerChange:
    peer: PeerConfig
    remove: bool = False


@dataclass
class Device:
    """What `get=1` says."""

    listen_port: int = 0
    public_keys: dict[bytes, dict] = field(default_factory=dict)  # peer -> its fields


def set_request(*, private_key: bytes | None = None, listen_port: int | None = None,
                changes: list[PeerChange] = ()) -> bytes:
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for ch in changes:
        lines.append(f"public_key={ch.peer.public_key.hex()}")
        if ch.remove:
            lines.append("remove=true")
            continue
        if ch.peer.endpoint:
            lines.append(f"endpoint={ch.peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={ch.peer.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={ip}" for ip in ch.peer.allowed_ips]
    return ("\n".join(lines) + "\n\n").encode()


GET_REQUEST = b"get=1\n\n"


def parse_answer(text: str) -> Device:
    """A `get=1` answer (or the errno line of a `set=1` one); raises UapiError on errno != 0."""
    dev, peer = Device(), None
    for line in text.split("\n"):
        if not line:
            continue
        key, _, value = line.partition("=")
        if key == "errno":
            if value != "0":
                raise UapiError(f"the WireGuard device refused the request (errno {value})")
        elif key == "listen_port":
            dev.listen_port = int(value)
        elif key == "public_key":
            peer = dev.public_keys.setdefault(bytes.fromhex(value), {"allowed_ips": []})
        elif peer is not None and key == "allowed_ip":
            peer["allowed_ips"].append(value)
        elif peer is not None:
            peer[key] = value
    return dev


def diff(current: dict[bytes, PeerConfig], desired: dict[bytes, PeerConfig]) -> list[PeerChange]:
    """The changes that make `current` into `desired`, one peer at a time (never the whole list)."""
    out = [PeerChange(p, remove=True) for k, p in sorted(current.items()) if k not in desired]
    out += [PeerChange(p) for k, p in sorted(desired.items()) if current.get(k) != p]
    return out


def wg_set_args(name: str, *, private_key_file: str | None = None, listen_port: int | None = None,
                changes: list[PeerChange] = ()) -> list[str]:
    """`wg set` arguments doing what `set_request` does over UAPI: a peer's allowed IPs are
    replaced (an empty string clears them), a removed peer is `remove`d."""
    args = ["set", name]
    if listen_port is not None:
        args += ["listen-port", str(listen_port)]
    if private_key_file is not None:
        args += ["private-key", private_key_file]
    for ch in changes:
        args += ["peer", base64.b64encode(ch.peer.public_key).decode()]
        if ch.remove:
            args.append("remove")
            continue
        if ch.peer.endpoint:
            args += ["endpoint", ch.peer.endpoint]
        args += ["persistent-keepalive", str(ch.peer.keepalive), "allowed-ips", ",".join(ch.peer.allowed_ips)]
    return args


def parse_dump(text: str) -> Device:
    """`wg show IFACE dump`: the interface's line (private key, public key, port, fwmark), then one
    tab-separated line per peer (key, preshared key, endpoint, allowed IPs, latest handshake,
    rx, tx, keepalive), read into the fields a `get=1` answer has."""
    dev = Device()
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return dev
    head = lines[0].split("\t")
    if len(head) >= 3 and head[2].isdigit():
        dev.listen_port = int(head[2])
    for line in lines[1:]:
        cols = line.split("\t")
        if len(cols) < 8:
            raise UapiError(f"wg show dump: a peer line with {len(cols)} columns")
        try:
            key = base64.b64decode(cols[0], validate=True)
        except ValueError:
            raise UapiError("wg show dump: a peer key that is not base64") from None
        dev.public_keys[key] = {
            "allowed_ips": [] if cols[3] in ("(none)", "") else cols[3].split(","),
            **({} if cols[2] == "(none)" else {"endpoint": cols[2]}),
            "last_handshake_time_sec": cols[4], "rx_bytes": cols[5], "tx_bytes": cols[6],
            "persistent_keepalive_interval": "0" if cols[7] == "off" else cols[7],
        }
    return dev

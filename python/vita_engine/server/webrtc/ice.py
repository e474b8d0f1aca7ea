"""ICE host addresses and STUN/TURN servers for the WebRTC transport.

aioice gathers host candidates from every interface except loopback (`aioice.ice.get_host_addresses`
leaves out 127.0.0.1), and aiortc adds Google's public STUN server when no `iceServers` are given.
Neither has an option for what we need (an operator-chosen host list; no STUN server unless
configured), so:
- `host_addresses(["127.0.0.1"])` is a context in which aioice gathers exactly these addresses.
  It works through one wrapper installed once around `aioice.ice.get_host_addresses` that consults
  a context variable: outside the context (other peer connections in the process, other libraries)
  aioice behaves as shipped. Gathering runs inside `setLocalDescription`, in tasks that inherit the
  caller's context, so wrapping that call is enough.
- `rtc_configuration(urls)` always passes an explicit (possibly empty) `iceServers` list.
"""
from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import re
from typing import Iterable, Optional, Sequence

_HOSTS: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("vita_ice_hosts", default=None)
_installed = False


def check_host(addr: str) -> str:
    """An ICE host address must be a literal IPv4/IPv6 address (aioice binds a UDP socket to it)."""
    try:
        return str(ipaddress.ip_address(addr.strip()))
    except ValueError:
        raise ValueError(f"ICE host address must be an IP address such as 127.0.0.1, got {addr!r}") from None


def _install() -> None:
    global _installed
    if _installed:
        return
    import aioice.ice as ice

    shipped = ice.get_host_addresses

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list:
        hosts = _HOSTS.get()
        if hosts is None:
            return shipped(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
        return [h for h in hosts if (":" in h and use_ipv6) or (":" not in h and use_ipv4)]

    get_host_addresses.__wrapped__ = shipped  # type: ignore[attr-defined]
    ice.get_host_addresses = get_host_addresses
    _installed = True


@contextlib.contextmanager
def host_addresses(hosts: Optional[Sequence[str]]):
    """Within this context, aioice gathers host candidates on exactly `hosts` (None or empty: as
    shipped, every non-loopback interface)."""
    if not hosts:
        yield
        return
    _install()
    tok = _HOSTS.set(tuple(check_host(h) for h in hosts))
    try:
        yield
    finally:
        _HOSTS.reset(tok)


def rtc_configuration(ice_servers: Iterable[str] = ()):
    """RTCConfiguration with exactly these STUN/TURN URLs (none by default: aiortc would otherwise
    add a public STUN server). TURN credentials ride in the URL: turn:user:pass@host:port."""
    from aiortc import RTCConfiguration, RTCIceServer

    servers = []
    for url in ice_servers:
        m = re.fullmatch(r"(turns?):([^:@]+):([^@]+)@(.+)", url)
        if m:
            servers.append(RTCIceServer(urls=f"{m.group(1)}:{m.group(4)}", username=m.group(2), credential=m.group(3)))
        else:
            servers.append(RTCIceServer(urls=url))
    return RTCConfiguration(iceServers=servers)


def check_ice_server(url: str) -> str:
    if not re.match(r"^(stuns?|turns?):\S+$", url or ""):
        raise ValueError(f"ICE server must be a stun:, stuns:, turn: or turns: URL (turn:user:pass@host:port), got {url!r}")
    return url


def only_loopback(hosts: Optional[Sequence[str]]) -> bool:
    return bool(hosts) and all(ipaddress.ip_address(h).is_loopback for h in hosts)


_CAND = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) ")


def keep_loopback_candidates(sdp: str) -> str:
    """Drop the offer's candidates whose address is not loopback. With loopback-only host
    candidates nothing else can pair, and leaving them out keeps the connectivity checks (and
    tests) from sending to the machine's other addresses."""
    out = []
    for line in sdp.splitlines():
        m = _CAND.match(line)
        if m:
            try:
                if not ipaddress.ip_address(m.group(1)).is_loopback:
                    continue
            except ValueError:  # an mDNS name (.local): not loopback either
                continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"

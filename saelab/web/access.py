"""Who the feature browser answers: requests whose Host header names this server and, off loopback, those that
carry its token (the printed URL's `?token=`, then the cookie it is traded for).

`Access.for_bind` decides it from the address the server is bound to; `saelab.web.server` checks each request
with it before any page is computed.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import socket
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlencode, urlsplit

_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?")


@dataclass(frozen=True)
class Access:
    """Which requests the server answers: those naming it in their Host header, and off loopback those carrying
    its token."""

    bound: str
    """The bound IP address."""
    port: int
    names: frozenset[str]
    """Host names answered (lower case) besides IP addresses: this machine's names, off loopback."""
    token: str | None = None
    """Required as ?token= (then the cookie it sets), or None (a loopback bind, or --no-token)."""

    @classmethod
    def for_bind(cls, host: str, bound: str, port: int, token: bool) -> Access:
        if host == "localhost" or ipaddress.ip_address(bound).is_loopback:
            return cls(bound, port, frozenset())
        names = {socket.gethostname(), socket.getfqdn()} | ({host} if not _is_ip(host) else set())
        secret = secrets.token_urlsafe(24) if token else None
        return cls(bound, port, frozenset(n.lower() for n in names if n), secret)

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.bound).is_loopback

    def host_ok(self, header: str, local: str) -> bool:
        """Whether `header` (a request's Host, which reached us on address `local`) names this server: a page
        whose own name resolves here (DNS rebinding) sends its own name and is refused."""
        m = _HOST.fullmatch(header.strip().lower())
        if m is None or int(m.group(2) or 80) != self.port:
            return False
        name = m.group(1).strip("[]")
        if name in self.names:
            return True
        here = ipaddress.ip_address(local)
        if name == "localhost":
            return here.is_loopback
        return _is_ip(name) and ipaddress.ip_address(name) in (here, ipaddress.ip_address(self.bound))

    @property
    def cookie_name(self) -> str:
        return f"saelab-token-{self.port}"  # cookies are per host, not per port: one per server

    def token_ok(self, given: str | None) -> bool:
        return self.token is not None and given is not None and hmac.compare_digest(given, self.token)

    def cookie_ok(self, header: str | None) -> bool:
        try:
            morsel = SimpleCookie(header or "").get(self.cookie_name)
        except CookieError:
            return False
        return morsel is not None and self.token_ok(morsel.value)

    def set_cookie(self) -> str:
        return f"{self.cookie_name}={self.token}; Path=/; HttpOnly; SameSite=Strict"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def pop_token(target: str) -> tuple[str, str | None]:
    """(target without its `token` parameter, the token or None)."""
    parts = urlsplit(target)
    params = parse_qsl(parts.query, keep_blank_values=True)
    tokens = [v for k, v in params if k == "token"]
    if not tokens:
        return target, None
    query = urlencode([(k, v) for k, v in params if k != "token"])
    return (parts.path or "/") + (f"?{query}" if query else ""), tokens[-1]

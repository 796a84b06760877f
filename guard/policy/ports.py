"""Port specifications: numbers, ranges and /etc/services names, with an optional protocol."""

from __future__ import annotations

import os

from guard.tuples import NamedTuple

SERVICES = "/etc/services"
PROTOCOLS = ("tcp", "udp")
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}  # IPPROTO_TCP, IPPROTO_UDP


class PortSpecError(ValueError):
    """A port specification that cannot be reserved; the message says why."""


class PortRange(NamedTuple):
    first: int
    last: int
    protocols: tuple[str, ...]

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return ports if len(self.protocols) > 1 else f"{ports}/{self.protocols[0]}"

    def pairs(self) -> list[tuple[str, int]]:
        return [
            (proto, port) for port in range(self.first, self.last + 1) for proto in self.protocols
        ]


def read_services(path: str | os.PathLike = SERVICES) -> dict[str, dict[str, int]]:
    """Service name (and aliases) -> {protocol: port}, from an /etc/services file."""
    services: dict[str, dict[str, int]] = {}
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return services
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or "/" not in fields[1]:
            continue
        number, _, proto = fields[1].partition("/")
        if not number.isdigit():
            continue
        for name in [fields[0], *fields[2:]]:
            services.setdefault(name, {}).setdefault(proto, int(number))
    return services


class Services:
    """Service names from an /etc/services file, read at the first name looked up: a
    configuration of port numbers never opens the file."""

    def __init__(self, path: str | os.PathLike = SERVICES):
        self.path = path
        self._names: dict[str, dict[str, int]] | None = None

    def get(self, name: str) -> dict[str, int] | None:
        if self._names is None:
            if not os.path.exists(self.path):
                # cups, dovecot, rsync and nfs-common do not pull netbase in: say where the
                # names come from rather than calling a well-known name unknown.
                raise PortSpecError(
                    f"service name {name!r} cannot be looked up: there is no {self.path} "
                    "(Debian's netbase package provides it); install it or give the port number"
                )
            self._names = read_services(self.path)
        return self._names.get(name)


def _port_number(
    text: str, services: Services | dict[str, dict[str, int]], protocols: tuple[str, ...]
) -> int:
    if text.isdigit():
        port = int(text)
        if not 1 <= port <= 65535:
            raise PortSpecError(f"port {port} is out of range (1-65535)")
        return port
    entry = services.get(text)
    if not entry:
        raise PortSpecError(f"unknown service name {text!r} (not in /etc/services)")
    # A service known for one protocol names the same port number for both: "ipp" is
    # listed as 631/tcp only, yet CUPS serves 631/udp too.
    for proto in protocols:
        if proto in entry:
            return entry[proto]
    return next(iter(entry.values()))


def parse_port_spec(
    spec: str, services: Services | dict[str, dict[str, int]] | None = None
) -> PortRange:
    """ "631", "ipp", "8000-8010/tcp", "53/udp" -> PortRange. No protocol means both."""
    if not isinstance(spec, str):
        raise PortSpecError(f"port entry {spec!r} must be a string")
    text = spec.strip()
    protocols: tuple[str, ...] = PROTOCOLS
    if "/" in text:
        text, _, proto = text.rpartition("/")
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise PortSpecError(f"unknown protocol {proto!r} in {spec!r} (tcp or udp)")
        protocols = (proto,)
    if not text:
        raise PortSpecError(f"empty port in {spec!r}")
    services = services if services is not None else Services()
    if "-" in text and text.replace("-", "").isdigit():
        low, _, high = text.partition("-")
        if not low or not high:
            raise PortSpecError(f"bad range {spec!r} (expected FIRST-LAST)")
        first = _port_number(low, services, protocols)
        last = _port_number(high, services, protocols)
        if first > last:
            raise PortSpecError(f"bad range {spec!r}: {first} is above {last}")
        return PortRange(first, last, protocols)
    port = _port_number(text, services, protocols)
    return PortRange(port, port, protocols)


def parse_check_target(
    text: str, services: dict[str, dict[str, int]] | None = None
) -> list[tuple[str, int]]:
    """The (protocol, port) pairs named by `portguard check PORT[/tcp|/udp]`."""
    spec = parse_port_spec(text, services)
    if spec.first != spec.last:
        raise PortSpecError("check takes one port, not a range")
    return spec.pairs()

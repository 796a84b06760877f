#!/usr/bin/python3
"""Runs inside the booted container, started by the test units (guest_files.py). Standard library
only.

serve PORT              owner: bind PORT tcp+udp (IPv4 and IPv6), tell systemd READY=1, wait
try PORT OUT            stranger: try to bind PORT every way, write {case: errno} to OUT
stay PORT OUT           the same, then tell systemd READY=1 and stay (its cgroup with it) until
                        SIGTERM: a refused caller that is still there when it is looked up
hammer PORT OUT         stranger: bind PORT tcp+udp in a loop until SIGTERM, write counts to OUT
watch PORT OUT          stranger: bind PORT (IPv4 tcp) once, tell systemd READY=1, then every
                        millisecond until the answer changes (refused -> allowed or back, or
                        60 s); write both answers and when it changed (CLOCK_MONOTONIC) to OUT
activated               socket-activated service: accept on fd 3, greet, exit
connect PORT            client: print what the socket-activated service says
"""

import json
import os
import signal
import socket
import sys
import time

CASES = {
    "v4/tcp": (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
    "v4/udp": (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"),
    "v6/tcp": (socket.AF_INET6, socket.SOCK_STREAM, "::"),
    "v6/udp": (socket.AF_INET6, socket.SOCK_DGRAM, "::"),
}


def bind(case: str, port: int) -> socket.socket:
    family, kind, address = CASES[case]
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def errno_of(case: str, port: int) -> int:
    try:
        bind(case, port).close()
        return 0
    except OSError as exc:
        return exc.errno


def write(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as out:
        json.dump(data, out)
    os.replace(path + ".tmp", path)


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect("\0" + address[1:] if address.startswith("@") else address)
            sock.send(message.encode())


def serve(port: int) -> None:
    sockets = [bind(case, port) for case in CASES]  # an error here fails the unit's start
    for sock in sockets:
        if sock.type == socket.SOCK_STREAM:
            sock.listen()
    notify("READY=1")
    signal.sigwait({signal.SIGTERM})


def hammer(port: int, out: str) -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    counts = {"attempts": 0, "bound": 0, "errors": {}}
    while not stop:
        for case in ("v4/tcp", "v4/udp", "v6/tcp"):
            err = errno_of(case, port)
            counts["attempts"] += 1
            if err == 0:
                counts["bound"] += 1
            else:
                counts["errors"][str(err)] = counts["errors"].get(str(err), 0) + 1
        if counts["attempts"] == 3:
            notify("READY=1")  # the first round is done: the hammering has begun
    write(out, counts)


def watch(port: int, out: str) -> None:
    # CLOCK_MONOTONIC is the kernel's, the same inside the container as on the host (nspawn
    # makes no time namespace): the benchmark subtracts the moment it ran daemon-reload.
    first = errno_of("v4/tcp", port)
    notify("READY=1")
    deadline = time.monotonic() + 60
    polls = 0
    while (now := time.monotonic()) < deadline:
        polls += 1
        answer = errno_of("v4/tcp", port)
        if answer != first:
            write(out, {"before": first, "after": answer, "changed_at": now, "polls": polls})
            return
        time.sleep(0.001)
    write(out, {"before": first, "after": first, "changed_at": None, "polls": polls})


def activated() -> None:
    if os.environ.get("LISTEN_FDS") != "1":
        sys.exit("expected one socket from systemd")
    listener = socket.socket(fileno=3)
    conn, _ = listener.accept()
    conn.sendall(f"hello from pid {os.getpid()}\n".encode())
    conn.close()


def connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        print(sock.makefile().readline().strip())


def main(argv: list[str]) -> None:
    action, args = argv[1], argv[2:]
    if action == "serve":
        serve(int(args[0]))
    elif action in ("try", "stay"):
        write(args[1], {case: errno_of(case, int(args[0])) for case in CASES})
        if action == "stay":
            notify("READY=1")
            signal.sigwait({signal.SIGTERM})
    elif action == "hammer":
        hammer(int(args[0]), args[1])
    elif action == "watch":
        watch(int(args[0]), args[1])
    elif action == "activated":
        activated()
    elif action == "connect":
        connect(int(args[0]))
    else:
        sys.exit(f"unknown action {action}")


if __name__ == "__main__":
    main(sys.argv)

"""Everything people and scripts see, in every format: apply's summary and warnings, remove,
build, status (text, JSON), check (text, JSON), monitor (text, JSON lines, journal entries).

Human output fits 100 columns: long cgroup paths and addresses are shortened from the left
with an ellipsis, keeping their informative end; JSON carries every value in full. Commands
(guard.cli) only choose what to render and where it goes.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, TextIO

from guard.observe import journal

if TYPE_CHECKING:  # the types rendered; apply's summary does without importing them
    from guard.observe.holders import Squatter
    from guard.observe.monitor import Denial
    from guard.observe.outcome import Failure
    from guard.observe.state import GuardState, ReservationState

WIDTH = 100
ELLIPSIS = "…"


def shorten(text: str, width: int, keep_end: bool = True) -> str:
    """text, or when longer than width its end (paths) or start (names) and an ellipsis."""
    if len(text) <= width:
        return text
    return ELLIPSIS + text[len(text) - width + 1 :] if keep_end else text[: width - 1] + ELLIPSIS


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 1] + ELLIPSIS


def errno_name(number: int | None) -> str:
    if number is None:
        return "-"
    return errno.errorcode.get(number, str(number)) if number else "EPERM"


class SecondClock:
    """time.strftime once per second: events come in bursts."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]):
        self.fmt, self.convert = fmt, convert
        self.second: int | None = None
        self.text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self.second:
            self.second, self.text = second, time.strftime(self.fmt, self.convert(second))
        return self.text


_utc_clock = SecondClock("%Y-%m-%dT%H:%M:%S", time.gmtime)


def iso_time(when: float) -> str:
    """RFC 3339 UTC with microseconds."""
    return f"{_utc_clock(when)}.{int(when % 1 * 1e6):06d}+00:00"


# ---- apply ----------------------------------------------------------------------------------


def warning_line(text: str) -> str:
    return f"portguard: warning: {text}"


def squatter_text(squatter: Squatter) -> str:
    holder = squatter.holder
    who = f"pid {holder.pid} ({holder.comm})" if holder.pid else "a socket of no process"
    return (
        f"port {squatter.port}/{squatter.protocol} is held by {who} in cgroup "
        f"{holder.cgroup or '(removed)'}, not an owner: it keeps the port until it "
        "closes it"
    )


def apply_line(changed: bool, ports: int, owner_cgroups: int, mode: str) -> str:
    state = "applied" if changed else "unchanged"
    return (
        f"portguard: {state}: {ports} reserved port/protocol pairs, "
        f"{owner_cgroups} owner cgroups, mode {mode}"
    )


def remove_line(removed: bool) -> str:
    return "portguard: removed" if removed else "portguard: nothing to remove"


def built_line(path: object) -> str:
    return f"portguard: built {path}"


# ---- status ---------------------------------------------------------------------------------


def status_json(state: GuardState, failure: Failure | None) -> str:
    import json  # only for JSON output: plain status, check and apply do without it

    data = asdict(state)
    data["links"] = {
        link["name"]: {k: v for k, v in link.items() if k != "name"} for link in data["links"]
    }
    data["last_apply_failure"] = asdict(failure) if failure else None
    return json.dumps(data, indent=2)


def squatters_line(count: int) -> str:
    return f"portguard: {count} reserved port holder(s) not an owner (SQUATTER)"


_RES = "{port:>5} {proto:5} {denied:>8} {dropped:>8}  {role:6} {what}"
_WHAT = WIDTH - len(_RES.format(port="", proto="", denied="", dropped="", role="", what=""))
_HOLDER_WHERE = _WHAT - 7 - 1 - 15 - 1 - 1 - 8


def failure_line(failure: Failure, loaded: bool) -> str:
    """Why the guard is not what the configuration asks for (see guard/observe/outcome.py)."""
    now = "the guard loaded before it is still in place" if loaded else "no guard is loaded"
    return f"portguard: the last apply failed ({failure.when}), {now}: {failure.message}"


def status_lines(state: GuardState, attach_cgroup: str) -> list[str]:
    if not state.loaded:
        return [_fit(f"portguard: not loaded (pin directory {state.pin_dir})")]
    lines = [
        (
            f"portguard: loaded, mode {state.mode}, "
            f"refused binds see {errno_name(state.deny_errno)}, "
            f"{state.lost_events} events lost"
        ),
        f"  attach cgroup {attach_cgroup}, pins {state.pin_dir}, program {state.program}",
    ]
    for link in state.links:
        where = f" cgroup id {link.cgroup_id}" if link.cgroup_id else ""
        lines.append(f"  link {link.name}: id {link.link_id}, program id {link.prog_id}{where}")
    if not state.holders_checked:
        lines.append("  holders not shown: run status in the guarded network namespace")
    lines.append(
        _RES.format(
            port="PORT",
            proto="PROTO",
            denied="DENIED",
            dropped="DROPPED",
            role="",
            what="OWNERS AND HOLDERS",
        )
    )
    for res in state.reservations:
        rows = []
        for owner in res.owners:
            known = f"id {owner.id}" if owner.id else "absent"
            name = owner.unit or owner.cgroup
            rows.append(("owner", shorten(name, _WHAT - len(known) - 3) + f" ({known})"))
        for holder in res.holders:
            pid = str(holder.pid) if holder.pid else "-"
            if holder.unit:
                where = shorten(holder.unit, _HOLDER_WHERE, keep_end=False)
            else:
                where = shorten(holder.cgroup or "(cgroup removed)", _HOLDER_WHERE)
            mark = "owner" if holder.owner else "SQUATTER"
            comm = (holder.comm or "-")[:15]
            rows.append(("holder", f"{pid:>7} {comm:15} {where:{_HOLDER_WHERE}} {mark}"))
        rows = rows or [("", "")]
        for i, (role, what) in enumerate(rows):
            first = i == 0
            dropped = res.contained_drops if res.contain else "-"
            line = _RES.format(
                port=res.port if first else "",
                proto=res.protocol if first else "",
                denied=res.denied if first else "",
                dropped=dropped if first else "",
                role=role,
                what=what,
            )
            lines.append(line.rstrip())
    return [_fit(line) for line in lines]


# ---- check ----------------------------------------------------------------------------------


def check_results(
    pairs: Sequence[tuple[str, int]], reservations: Sequence[ReservationState]
) -> list[dict]:
    """One entry per asked (protocol, port): reserved or not, and for whom."""
    by_key = {(r.protocol, r.port): r for r in reservations}
    results = []
    for proto, number in pairs:
        res = by_key.get((proto, number))
        results.append(
            {
                "port": number,
                "protocol": proto,
                "reserved": res is not None,
                "owners": [asdict(o) for o in res.owners] if res else [],
            }
        )
    return results


def check_json(results: list[dict]) -> str:
    import json

    return json.dumps(results, indent=2)


def check_lines(results: list[dict]) -> list[str]:
    lines = []
    for item in results:
        if item["reserved"]:
            owners = ", ".join(o["cgroup"] for o in item["owners"])
            lines.append(f"{item['port']}/{item['protocol']}: reserved for {owners}")
        else:
            lines.append(f"{item['port']}/{item['protocol']}: not reserved")
    return lines


# ---- monitor --------------------------------------------------------------------------------

# TIME PID COMM UID CGROUP/UNIT PROTO ADDR:PORT OWNER(S) VERDICT, like bcc's bindsnoop
_COLUMNS = "{:8} {:>7} {:15} {:>6} {:17} {:4} {:>16} {:12} {}"
_CALLER_WIDTH = 17
MONITOR_HEADER = _COLUMNS.format(
    "TIME", "PID", "COMM", "UID", "CGROUP/UNIT", "PROT", "ADDR:PORT", "OWNER(S)", "VERDICT"
)


def _last_component(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or "/"


def _owners_column(owners: tuple[str, ...]) -> str:
    if not owners:
        return "-"
    more = f"+{len(owners) - 1}" if len(owners) > 1 else ""
    return shorten(_last_component(owners[0]), 12 - len(more), keep_end=False) + more


def address_port(denial: Denial) -> str:
    host = f"[{denial.address}]" if denial.family == "ipv6" else denial.address
    return f"{host}:{denial.port}"


_local_clock = SecondClock("%H:%M:%S", time.localtime)


def monitor_line(denial: Denial) -> str:
    pid, uid = str(denial.pid), str(denial.uid)
    # a pid or uid wider than its column takes room from the caller's: the line still fits
    caller_width = _CALLER_WIDTH - max(0, len(pid) - 7) - max(0, len(uid) - 6)
    if denial.unit:
        caller = shorten(denial.unit, caller_width, keep_end=False)
    else:
        caller = shorten(denial.cgroup or f"id:{denial.cgroup_id}", caller_width)
    return _COLUMNS.replace("{:17}", f"{{:{caller_width}}}").format(
        _local_clock(denial.time),
        pid,
        denial.comm[:15],
        uid,
        caller,
        f"{denial.protocol}{denial.family[-1]}",
        shorten(address_port(denial), 16),
        _owners_column(denial.owners),
        denial.verdict,
    )


def denial_json(denial: Denial) -> dict:
    return {
        "time": iso_time(denial.time),
        "pid": denial.pid,
        "uid": denial.uid,
        "comm": denial.comm,
        "cgroup": denial.cgroup,
        "cgroup_id": denial.cgroup_id,
        "unit": denial.unit,
        "family": denial.family,
        "protocol": denial.protocol,
        "address": denial.address,
        "port": denial.port,
        "owners": list(denial.owners),
        "verdict": denial.verdict,
    }


def monitor_ready_line(pin_dir: str) -> str:
    return f"portguard: monitoring refused binds of {pin_dir}"


def monitor_summary_line(received: int, lost: int) -> str:
    return f"portguard: {received} events, {lost} lost"


def lost_line(count: int) -> str:
    return f"lost {count} events (the event buffer was full; the DENIED counters stay exact)"


def journal_fields(denial: Denial) -> list[tuple[str, object]]:
    what = "refused" if denial.verdict == "denied" else "would refuse (audit mode)"
    caller = denial.unit or denial.cgroup or f"cgroup id {denial.cgroup_id}"
    owners = ", ".join(denial.owners) or "nobody"
    fields: list[tuple[str, object]] = [
        (
            "MESSAGE",
            (
                f"{what} bind of {address_port(denial)}/{denial.protocol} by pid {denial.pid} "
                f"({denial.comm}) in {caller}; reserved for {owners}"
            ),
        ),
        (
            "PRIORITY",
            (journal.PRIORITY_WARNING if denial.verdict == "denied" else journal.PRIORITY_NOTICE),
        ),
        ("PORTGUARD_VERDICT", denial.verdict),
        ("PORTGUARD_PORT", denial.port),
        ("PORTGUARD_PROTOCOL", denial.protocol),
        ("PORTGUARD_FAMILY", denial.family),
        ("PORTGUARD_ADDRESS", denial.address),
        ("PORTGUARD_PID", denial.pid),
        ("PORTGUARD_UID", denial.uid),
        ("PORTGUARD_COMM", denial.comm),
        ("PORTGUARD_CGROUP", denial.cgroup or ""),
        # journald adds the OBJECT_* fields (unit, exe, ...) of this process while it lives
        ("OBJECT_PID", denial.pid),
    ]
    if denial.unit:
        fields.append(("PORTGUARD_UNIT", denial.unit))
    fields += [("PORTGUARD_OWNER", owner) for owner in denial.owners]
    return fields


class TextSink:
    def __init__(self, out: TextIO):
        self.out = out

    def start(self) -> None:
        self.out.write(MONITOR_HEADER + "\n")

    def denial(self, denial: Denial) -> None:
        self.out.write(monitor_line(denial) + "\n")

    def lost(self, count: int) -> None:
        self.out.write(lost_line(count) + "\n")

    def flush(self) -> None:
        self.out.flush()


class JsonSink:
    def __init__(self, out: TextIO):
        import json

        self.out = out
        self.dumps = json.dumps

    def start(self) -> None:
        pass

    def denial(self, denial: Denial) -> None:
        self.out.write(self.dumps(denial_json(denial)) + "\n")

    def lost(self, count: int) -> None:
        self.out.write(self.dumps({"lost": count}) + "\n")

    def flush(self) -> None:
        self.out.flush()


class JournalSink:
    def __init__(self, target: journal.Journal):
        self.journal = target

    def start(self) -> None:
        pass

    def denial(self, denial: Denial) -> None:
        self.journal.send(journal_fields(denial))

    def lost(self, count: int) -> None:
        self.journal.send(
            [
                ("MESSAGE", lost_line(count)),
                ("PRIORITY", journal.PRIORITY_WARNING),
                ("PORTGUARD_LOST", count),
            ]
        )

    def flush(self) -> None:
        pass

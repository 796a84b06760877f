"""Everything people and scripts see, in every format: apply's summary and warnings, remove,
build, status (text, JSON), check (text, JSON), monitor (text, JSON lines, journal entries).

Human output fits 100 columns: long cgroup paths and addresses are shortened from the left
with an ellipsis, keeping their informative end; JSON carries every value in full. Commands
(guard.cli) only choose what to render and where it goes.
"""

from __future__ import annotations

import errno
import time

from guard.policy.ports import PROTOCOL_NUMBERS

TYPE_CHECKING = False  # typing (with re and enum) stays off the boot's apply
if TYPE_CHECKING:  # the types rendered; apply's summary does without importing them
    from collections.abc import Callable, Sequence  # (it would import collections)
    from typing import TextIO

    from guard.observe.holders import Squatter
    from guard.observe.journal import Journal
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


def plain(value: object) -> object:
    """The read model (NamedTuples) as JSON takes it, as dataclasses.asdict gave it when it was
    dataclasses: each record a dict, recursively, also inside tuples, lists and dicts (which
    _asdict alone does not do)."""
    if hasattr(value, "_asdict"):
        return {key: plain(item) for key, item in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def status_json(state: GuardState, failure: Failure | None, **facts: object) -> str:
    """state, the last apply's failure and the facts status adds (config_matches, ...)."""
    import json  # only for JSON output: plain status, check and apply do without it

    data = plain(state)
    data["links"] = {
        link["name"]: {k: v for k, v in link.items() if k != "name"} for link in data["links"]
    }
    data["last_apply_failure"] = failure._asdict() if failure else None
    data.update(facts)
    return json.dumps(data, indent=2)


def squatters_line(count: int) -> str:
    return f"portguard: {count} reserved port holder(s) not an owner (SQUATTER)"


_RES = "{port:>5} {proto:5} {denied:>8} {dropped:>8}  {role:6} {what}"
_WHAT = WIDTH - len(_RES.format(port="", proto="", denied="", dropped="", role="", what=""))
_COMM = 12
_ADDRESS = 15  # "255.255.255.255", "[::]", "[::1]"; longer IPv6 addresses are shortened
_HOLDER_WHERE = _WHAT - 7 - 1 - _COMM - 1 - _ADDRESS - 1 - 1 - 8


def failure_line(failure: Failure, loaded: bool) -> str:
    """Why the guard is not what the configuration asks for (see guard/observe/outcome.py)."""
    now = "the guard loaded before it is still in place" if loaded else "no guard is loaded"
    return f"portguard: the last apply failed ({failure.when}), {now}: {failure.message}"


def _port_runs(pairs: list[tuple[str, int, tuple]]) -> list[tuple[str, str, tuple]]:
    """(protocol, port, owners) sorted -> (ports "N" or "FIRST-LAST", protocol, owners): a
    range owned alike is one line, however many ports it spans."""
    runs: list[list] = []
    for proto, port, owners in pairs:
        last = runs[-1] if runs else None
        if last and last[1] == proto and last[3] == owners and last[2] == port - 1:
            last[2] = port
        else:
            runs.append([port, proto, port, owners])
    return [
        (str(first) if first == end else f"{first}-{end}", proto, owners)
        for first, proto, end, owners in runs
    ]


def wrap(head: str, items: list[str], indent: str = "    ") -> list[str]:
    """head followed by items joined with ", ", folded into lines of at most WIDTH."""
    lines, line = [], head
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(line) + 1 + len(piece) > WIDTH and line.strip():
            lines.append(line)
            line = indent + piece
        else:
            line = f"{line} {piece}" if line else piece
    lines.append(line)
    return [_fit(text) for text in lines]


_PLAN = "{ports:>11} {proto:5}  {owner}"
_PLAN_OWNER = WIDTH - len(_PLAN.format(ports="", proto="", owner=""))


def plan_lines(cfg, plan, skipped=()) -> list[str]:
    """apply --dry-run: what the files say, as apply would load it."""
    settings = plan.settings
    lines = wrap("portguard: the configuration is valid; read:", list(cfg.files) or ["nothing"])
    lines += wrap(
        f"  mode {settings.mode},",
        [
            f"refused binds see {settings.deny_errno}",
            f"attach cgroup {settings.cgroup}",
            f"pins {settings.pin_dir}",
        ],
    )
    lines.append(_PLAN.format(ports="PORTS", proto="PROTO", owner="OWNERS (UNIT: CGROUP)"))
    by_proto = {number: name for name, number in PROTOCOL_NUMBERS.items()}
    pairs = [
        (by_proto.get(proto, str(proto)), port, plan.owners_of(proto, port))
        for proto, port in sorted(plan.ports)
    ]
    runs = sorted(_port_runs(pairs), key=lambda run: (int(run[0].split("-")[0]), run[1]))
    for ports, proto, paths in runs:
        for i, path in enumerate(paths):
            units = ", ".join(plan.owner_names.get(path, ()))
            owner = f"{units}: {path}" if units else path
            lines.append(
                _PLAN.format(
                    ports=ports if i == 0 else "",
                    proto=proto if i == 0 else "",
                    owner=shorten(owner, _PLAN_OWNER),
                ).rstrip()
            )
        first, _, last = ports.partition("-")
        origins = {
            str(origin): None
            for port in range(int(first), int(last or first) + 1)
            for origin in plan.origins.get((proto, port), ())
        }
        if origins:
            from_text = _fit_origins("from ", list(origins), _PLAN_OWNER)
            lines.append(_PLAN.format(ports="", proto="", owner=from_text).rstrip())
    if not plan.ports:
        lines.append(_PLAN.format(ports="-", proto="", owner="nothing is reserved"))
    if skipped:
        ports = [str(port_range) for block in skipped for port_range, _ in block.ports]
        lines += wrap("  not reserved here, none of their units is installed:", ports)
    return lines


def unit_file_lines(problems: Sequence[str], notes: Sequence[str]) -> list[str]:
    """X-PortGuard-Reserve= declarations left out: problems (a unit's ports are not guarded)
    as warnings, notes (what systemd would not load either) as notes."""
    return [warning_line(problem) for problem in problems] + [
        f"portguard: note: {note}" for note in notes
    ]


def dropins_written_lines(paths: Sequence[str], portreserve_dir: str) -> list[str]:
    """import-portreserve --drop-ins: what was written and what is left to do."""
    if not paths:
        return [f"portguard: {portreserve_dir} reserves nothing; no drop-in written"]
    return [
        *(f"wrote {path}" for path in paths),
        "portguard: run `systemctl daemon-reload` to apply them (portguard re-applies with it).",
        f"  {portreserve_dir} is still read too (the same ports, the same owners); remove its",
        '  files or set portreserve_dir = "" in [guard] once the drop-ins are in place.',
    ]


def dry_run_changes(differences: list[str]) -> list[str]:
    if not differences:
        return ["portguard: apply would change nothing: the loaded guard is this configuration"]
    return [
        "portguard: apply would change the loaded guard:",
        *(f"  {line}" for line in differences),
    ]


def drift_lines(differences: list[str]) -> list[str]:
    """Why the loaded guard is not the configuration's (see guard/drift.py)."""
    if not differences:
        return []
    return [
        "portguard: the loaded guard is not what the configuration files ask for",
        "  (portguard apply, or systemctl reload portguard, loads them):",
        *(f"  {line}" for difference in differences for line in difference.splitlines()),
    ]


def holder_address(holder) -> str:
    """IPv6 in brackets, as ss and the monitor write it: the family at a glance."""
    address = f"[{holder.address}]" if holder.family == "ipv6" else holder.address
    return shorten(address, _ADDRESS, keep_end=False)


def _owner_rows(owners, verbose: bool) -> list[tuple[str, str]]:
    """One row per owner whose cgroup exists; owners that do not exist here (not installed,
    not started, or another distribution's name for the service) in one row unless verbose."""
    rows, absent = [], []
    for owner in owners:
        last = _last_component(owner.cgroup)
        name = owner.unit or (last if last.endswith(".slice") else owner.cgroup)
        if owner.id or verbose:
            known = f"id {owner.id}" if owner.id else "absent"
            rows.append(("owner", shorten(name, _WHAT - len(known) - 3) + f" ({known})"))
        else:
            absent.append(name)
    if absent:
        rows.append(("owner", _fit_names("absent: ", absent, _WHAT)))
    return rows


def _fit_origins(head: str, origins: list[str], width: int) -> str:
    """head + as many file:line as fit, then "+N more"; a long path keeps its end."""
    text = _fit_names(head, origins, width)
    if origins[0] in text:
        return text
    more = f" +{len(origins) - 1} more" if len(origins) > 1 else ""
    return head + shorten(origins[0], width - len(head) - len(more)) + more


def _fit_names(head: str, names: list[str], width: int) -> str:
    """head + as many names as fit, then "+N more"."""
    for shown in range(len(names), 0, -1):
        more = f" +{len(names) - shown} more" if shown < len(names) else ""
        text = head + ", ".join(names[:shown]) + more
        if len(text) <= width:
            return text
    return shorten(head + f"{len(names)} owners", width, keep_end=False)


# where binds are refused (GuardState.refuse_at), as status says it
REFUSE_AT_TEXT = {
    "cgroup": "the cgroup bind hooks (bpf_set_retval)",
    "security_socket_bind": "security_socket_bind (fmod_ret; no bpf_set_retval here)",
    "cgroup-eperm": "the cgroup bind hooks, EPERM only (no bpf_set_retval here)",
}


def status_lines(state: GuardState, attach_cgroup: str, verbose: bool = False) -> list[str]:
    if not state.loaded:
        return [_fit(f"portguard: not loaded (pin directory {state.pin_dir})")]
    lines = [
        (
            f"portguard: loaded, mode {state.mode}, "
            f"refused binds see {errno_name(state.deny_errno)}, "
            f"{state.lost_events} events lost"
        ),
        f"  binds refused at {REFUSE_AT_TEXT.get(state.refuse_at or '', state.refuse_at)}",
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
        rows = _owner_rows(res.owners, verbose)
        for holder in res.holders:
            pid = str(holder.pid) if holder.pid else "-"
            if holder.unit:
                where = shorten(holder.unit, _HOLDER_WHERE, keep_end=False)
            else:
                where = shorten(holder.cgroup or "(cgroup removed)", _HOLDER_WHERE)
            mark = "owner" if holder.owner else "SQUATTER"
            comm = (holder.comm or "-")[:_COMM]
            address = holder_address(holder)
            rows.append(
                (
                    "holder",
                    f"{pid:>7} {comm:{_COMM}} {address:{_ADDRESS}} {where:{_HOLDER_WHERE}} {mark}",
                )
            )
        if res.origins:
            rows.append(("from", _fit_origins("", list(res.origins), _WHAT)))
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
                "owners": [plain(o) for o in res.owners] if res else [],
                "origins": list(res.origins) if res else [],
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
            if item["origins"]:
                lines += wrap("  reserved by", item["origins"], indent="    ")
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


def _pid_text(denial: Denial, unknown: str = "?") -> str:
    """The caller's pid in the reader's pid namespace (see monitor.LocalPids)."""
    return unknown if denial.pid is None else str(denial.pid)


def monitor_line(denial: Denial) -> str:
    pid, uid = _pid_text(denial, "-"), str(denial.uid)
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
        "host_pid": denial.host_pid,
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


def lost_line(count: int) -> str:
    return f"lost {count} events (the event buffer was full; the DENIED counters stay exact)"


def journal_fields(denial: Denial) -> list[tuple[str, object]]:
    what = "refused" if denial.verdict == "denied" else "would refuse (audit mode)"
    caller = denial.unit or denial.cgroup or f"cgroup id {denial.cgroup_id}"
    owners = ", ".join(denial.owners) or "nobody"
    from guard.observe import journal  # the journal's socket: monitor --journal only

    fields: list[tuple[str, object]] = [
        (
            "MESSAGE",
            (
                f"{what} bind of {address_port(denial)}/{denial.protocol} by pid "
                f"{_pid_text(denial)} "
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
        ("PORTGUARD_PID", denial.pid if denial.pid is not None else ""),
        ("PORTGUARD_HOST_PID", denial.host_pid if denial.host_pid is not None else denial.pid),
        ("PORTGUARD_UID", denial.uid),
        ("PORTGUARD_COMM", denial.comm),
        ("PORTGUARD_CGROUP", denial.cgroup or ""),
        ("PORTGUARD_CGROUP_ID", denial.cgroup_id),
    ]
    if denial.pid is not None:
        # journald adds the OBJECT_* fields (unit, exe, ...) of this process while it lives
        fields.append(("OBJECT_PID", denial.pid))
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

    def finish(self) -> None:
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

    def finish(self) -> None:
        self.out.flush()


class _Window:
    """One (caller cgroup, port, protocol)'s current rate-limit interval."""

    __slots__ = ("start", "suppressed", "last")

    def __init__(self, start: float) -> None:
        self.start = start
        self.suppressed = 0
        self.last: Denial | None = None  # the last suppressed refusal, named in the summary


def suppressed_fields(last: Denial, count: int, interval: float) -> list[tuple[str, object]]:
    """The entry that stands for `count` refusals not logged one by one."""
    fields = journal_fields(last)
    what = "refused" if last.verdict == "denied" else "would have refused (audit mode)"
    caller = last.unit or last.cgroup or f"cgroup id {last.cgroup_id}"
    fields[0] = (
        "MESSAGE",
        f"{what} {count} more binds of {address_port(last)}/{last.protocol} in {caller} "
        f"within {interval:g} s (the last by pid {_pid_text(last)} ({last.comm})); journal entries "
        f"are limited to one per {interval:g} s (journal_interval)",
    )
    return [*fields, ("PORTGUARD_SUPPRESSED", count), ("PORTGUARD_INTERVAL", f"{interval:g}")]


class JournalSink:
    """Journal entries, at most one per (caller cgroup, port, protocol) per interval: the first
    refusal at once, the ones after it counted and logged as one entry (PORTGUARD_SUPPRESSED)
    when the interval ends, as the kernel's printk and SELinux's AVC limit theirs. Anyone can
    call bind() in a loop; the journal must not grow with it. interval 0: every refusal."""

    MAX_WINDOWS = 4096  # then every summary is written at once and counting starts over

    def __init__(self, target: Journal, interval: float = 0.0, clock=time.monotonic) -> None:
        self.journal = target
        self.interval = interval
        self.clock = clock
        self.windows: dict[tuple[int, int, str], _Window] = {}

    def start(self) -> None:
        pass

    def denial(self, denial: Denial) -> None:
        if self.interval <= 0:
            self.journal.send(journal_fields(denial))
            return
        now = self.clock()
        key = (denial.cgroup_id, denial.port, denial.protocol)
        window = self.windows.get(key)
        if window is not None and now - window.start >= self.interval:
            window = self._end(key, window, now)
        if window is None:
            if len(self.windows) >= self.MAX_WINDOWS:
                self.finish()
            self.journal.send(journal_fields(denial))
            self.windows[key] = _Window(now)
            return
        window.suppressed += 1
        window.last = denial

    def _end(self, key: tuple[int, int, str], window: _Window, now: float) -> _Window | None:
        """Log what the interval suppressed. While refusals go on, the next interval starts
        (and is suppressed too); after a quiet one, the next refusal is logged at once."""
        del self.windows[key]
        if not window.suppressed:
            return None
        self.journal.send(suppressed_fields(window.last, window.suppressed, self.interval))
        self.windows[key] = _Window(now)
        return self.windows[key]

    def lost(self, count: int) -> None:
        from guard.observe import journal

        self.journal.send(
            [
                ("MESSAGE", lost_line(count)),
                ("PRIORITY", journal.PRIORITY_WARNING),
                ("PORTGUARD_LOST", count),
            ]
        )

    def flush(self) -> None:
        """Called after every poll: ends the intervals that are over."""
        now = self.clock()
        for key, window in list(self.windows.items()):
            if now - window.start >= self.interval:
                self._end(key, window, now)

    def finish(self) -> None:
        for key, window in list(self.windows.items()):
            del self.windows[key]
            if window.suppressed:
                self.journal.send(suppressed_fields(window.last, window.suppressed, self.interval))


def monitor_summary(summary) -> str:
    """The monitor's last line: what it showed and what it did not, adding up to the refusals
    the kernel counted since the start."""
    line = f"portguard: {summary.received} events, {summary.lost} lost"
    if summary.received_before_start:
        line += f" ({summary.received_before_start} from before the start)"
    if summary.left:
        line += f", {summary.left} not shown (still in the event buffer at exit)"
    line += f"; {summary.refused} binds refused since the start"
    if summary.stopped_by:
        line += f"; stopped by {summary.stopped_by}"
    return line


# ---- demo -----------------------------------------------------------------------------------

_WAYS = ("IPv4/tcp", "IPv4/udp", "IPv6/tcp", "IPv6/udp")


def demo_bind_table(outcomes: dict[str, dict[str, str]]) -> list[str]:
    """unit -> {way: "ok" or errno name}: one aligned row per unit, "bound" or the error."""
    width = max(len("UNIT"), *(len(unit) for unit in outcomes))
    lines = [f"  {'UNIT':{width}}  " + "  ".join(f"{way:10}" for way in _WAYS).rstrip()]
    for unit, result in outcomes.items():
        if "error" in result:
            lines.append(f"  {unit:{width}}  could not run: {result['error']}")
            continue
        cells = ["bound" if result.get(way) == "ok" else result.get(way, "-") for way in _WAYS]
        lines.append(f"  {unit:{width}}  " + "  ".join(f"{cell:10}" for cell in cells).rstrip())
    return lines


def demo_resvport_lines(result: dict, refused: int) -> list[str]:
    got = result.get("bindresvport")
    if isinstance(got, int) and refused:
        met = "1 reserved port" if refused == 1 else f"{refused} reserved ports"
        return wrap(
            f"  it got port {got}:",
            [f"it met {met} on the way, refused with EADDRINUSE", "so it moved on."],
            indent="  ",
        )
    if isinstance(got, int):
        return [f"  it got port {got}: no reserved port was in its way this time."]
    return wrap(
        f"  it failed with {got or result.get('error')}:",
        ["a refusal other than EADDRINUSE stops it"],
        indent="  ",
    )


# ---- prometheus -----------------------------------------------------------------------------


def _labels(**labels: object) -> str:
    def escape(value: object) -> str:
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    inner = ",".join(f'{name}="{escape(value)}"' for name, value in labels.items())
    return "{" + inner + "}" if inner else ""


def prometheus_lines(
    state: GuardState,
    *,
    config_matches: bool,
    squatter_keys: set[tuple[int, str]],
    bindresvport_exposed: list[int],
    apply_failed: bool,
) -> list[str]:
    """status in Prometheus' text exposition format (for node_exporter's textfile collector
    or any scraper): counters end in _total, 0/1 gauges for states, one series per
    reservation labelled port and protocol."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, object]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{_labels(**labels)} {value}" for labels, value in samples)

    metric(
        "portguard_guard_loaded",
        "gauge",
        "1 when the guard's bind programs are attached.",
        [({}, int(state.loaded))],
    )
    metric(
        "portguard_config_matches",
        "gauge",
        "1 when the loaded guard is what the configuration files ask for.",
        [({}, int(config_matches))],
    )
    metric(
        "portguard_last_apply_failed",
        "gauge",
        "1 when the last portguard apply failed (see portguard status).",
        [({}, int(apply_failed))],
    )
    if not state.loaded:
        return lines
    metric(
        "portguard_guard_info",
        "gauge",
        "The loaded guard: mode, the errno refused binds see, where binds are refused "
        "(cgroup, security_socket_bind, cgroup-eperm), the program.",
        [
            (
                {
                    "mode": state.mode or "",
                    "deny_errno": errno_name(state.deny_errno),
                    "refuse_at": state.refuse_at or "",
                    "program": state.program or "",
                },
                1,
            )
        ],
    )
    metric(
        "portguard_events_lost_total",
        "counter",
        "Refusal events the full event buffer dropped (the refusal counters stay exact).",
        [({}, state.lost_events)],
    )
    metric(
        "portguard_bindresvport_exposed_ports",
        "gauge",
        "Reserved ports in 512-1023 at which bindresvport() would give up (refusals are not "
        "EADDRINUSE and /etc/bindresvport.blacklist does not list them).",
        [({}, len(bindresvport_exposed))],
    )
    reservations = state.reservations

    def per_reservation(value) -> list[tuple[dict, object]]:
        return [({"port": r.port, "protocol": r.protocol}, value(r)) for r in reservations]

    metric(
        "portguard_refused_binds_total",
        "counter",
        "Binds to the reserved port refused (in audit mode: that would have been refused).",
        per_reservation(lambda r: r.denied),
    )
    metric(
        "portguard_dropped_packets_total",
        "counter",
        "Packets of non-owner sockets on the reserved port dropped (contain = true).",
        per_reservation(lambda r: r.contained_drops),
    )
    if state.holders_checked:
        metric(
            "portguard_holders",
            "gauge",
            "Sockets bound to the reserved port now.",
            per_reservation(lambda r: len(r.holders)),
        )
        metric(
            "portguard_squatter_present",
            "gauge",
            "1 when a socket on the reserved port is held by a non-owner.",
            per_reservation(lambda r: int((r.port, r.protocol) in squatter_keys)),
        )
    return lines

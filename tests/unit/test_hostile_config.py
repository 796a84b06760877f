"""Hostile configuration files: only clean errors (exit 2, file:line), never a traceback, never
an apply with a partial plan.

Generated with hypothesis: TOML built from the real keys with random and mutated values,
random bytes and odd encodings, portreserve files. The default run makes about 3,000 files;
PORTGUARD_FUZZ_EXAMPLES=10000 (the soak sets it) makes about 15,000.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard import cli
from guard.kernel import apply as apply_mod
from guard.kernel.layout import LIMITS
from guard.policy import config, owners, plan
from guard.policy.portreserve import PortreserveError, read_file, to_toml

EXAMPLES = int(os.environ.get("PORTGUARD_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SMALL = settings(FUZZ, max_examples=max(EXAMPLES // 4, 50))
CLEAN = re.compile(r"^\S.*:\d+: ")

# ---- generators ---------------------------------------------------------------------------------

port_text = st.one_of(
    st.integers(-5, 70000).map(str),
    st.tuples(st.integers(0, 66000), st.integers(0, 66000)).map(
        lambda r: f"{r[0]}-{r[0] + r[1] % 40}"
    ),
    st.sampled_from(
        ["ipp", "ssh", "nfs", "sunrpc", "no-such-service", "", "/tcp", "-", "1-", "x/udp"]
    ),
).flatmap(lambda p: st.sampled_from([p, f"{p}/tcp", f"{p}/udp", f"{p}/sctp"]))
cgroup_text = st.one_of(
    st.sampled_from(["/system.slice/cups.service", "/", "relative", "/a/../b", "/a/./b", "/a\0b"]),
    st.integers(1, 600).map(lambda n: "/" + "/".join(["d" * 60] * (n // 61 + 1))[:n]),
    st.text(max_size=40).map(lambda t: "/" + t),
)
toml_scalar = st.one_of(
    st.text(max_size=30),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.floats(allow_nan=True),
    st.just([]),
    st.just({}),
)


def _quote(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_quote(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}"
    return (
        '"'
        + value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\0", "\\u0000")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
        + '"'
    )


@st.composite
def toml_files(draw) -> bytes:
    lines = []
    if draw(st.booleans()):
        lines.append("[guard]")
        for key in draw(
            st.lists(
                st.sampled_from(["cgroup", "pin_dir", "deny_errno", "mode", "trust_init", "bogus"]),
                max_size=4,
            )
        ):
            value = draw(
                st.one_of(
                    cgroup_text,
                    st.sampled_from(["EADDRINUSE", "eperm", "EIO", "audit", "enforce", "x", True]),
                    toml_scalar,
                )
            )
            lines.append(f"{key} = {_quote(value)}")
    for _ in range(draw(st.integers(0, 4))):
        lines.append(
            draw(st.sampled_from(["[[reserve]]", "[reserve]", "[[ reserve ]]", "[other]"]))
        )
        for key in draw(
            st.lists(
                st.sampled_from(
                    [
                        "ports",
                        "cgroup",
                        "cgroups",
                        "unit",
                        "units",
                        "slice",
                        "if_installed",
                        "comment",
                        "nope",
                    ]
                ),
                max_size=4,
            )
        ):
            if key == "ports":
                value = draw(
                    st.one_of(
                        st.lists(st.one_of(port_text, st.integers(-1, 70000)), max_size=5),
                        toml_scalar,
                    )
                )
            elif key in ("cgroup", "unit", "slice"):
                value = draw(st.one_of(cgroup_text, toml_scalar))
            elif key in ("cgroups", "units"):
                value = draw(st.one_of(st.lists(cgroup_text, max_size=3), toml_scalar))
            else:
                value = draw(toml_scalar)
            lines.append(f"{key} = {_quote(value)}")
    text = "\n".join(lines) + "\n"
    for _ in range(draw(st.integers(0, 3))):  # mutations: cut, duplicate, insert junk
        if not text:
            break
        at = draw(st.integers(0, len(text)))
        text = draw(
            st.sampled_from(
                [
                    text[:at],
                    text[:at] + text[at // 2 :],
                    text[:at] + draw(st.text(max_size=8)) + text[at:],
                    text[:at] + "[" * draw(st.integers(1, 3000)) + text[at:],
                ]
            )
        )
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return text.encode(encoding, errors="replace")


# ---- the properties -------------------------------------------------------------------------


def _run_apply(path: Path, monkeypatch) -> tuple[int, list]:
    applied = []
    monkeypatch.setattr(
        apply_mod,
        "apply",
        lambda p, settle=None: applied.append(p) or apply_mod.ApplyResult(True, True, "retval", []),
    )
    result = CliRunner().invoke(cli.main, ["--config", str(path), "apply"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the bug this test exists for
    return result.exit_code, applied, result.output


def _assert_clean(path: Path, monkeypatch) -> None:
    code, applied, output = _run_apply(path, monkeypatch)
    assert code in (0, 2), output
    if code == 2:
        assert not applied, "a refused configuration reached apply"
        problems = output.split("nothing applied:\n", 1)[-1].strip().splitlines()
        assert problems and all(CLEAN.match(p) for p in problems), output
        assert all(p.startswith(str(path)) for p in problems), output
    else:
        assert len(applied) == 1
        whole = applied[0]
        assert isinstance(whole, plan.Plan)
        assert all(len(p.encode()) <= config.MAX_PATH_BYTES for p in whole.paths)


@FUZZ
@given(content=toml_files())
def test_generated_toml_gives_a_whole_plan_or_clean_errors(content, scratch):
    scratch.write_bytes(content)
    _assert_clean(scratch, scratch.monkeypatch)


@FUZZ_SMALL
@given(content=st.binary(max_size=2000))
def test_random_bytes_give_clean_errors(content, scratch):
    scratch.write_bytes(content)
    _assert_clean(scratch, scratch.monkeypatch)


@FUZZ_SMALL
@given(
    lines=st.lists(st.one_of(port_text, st.text(max_size=20)), max_size=8),
    name=st.sampled_from(["cups", "rpcbind", "a" * 300, "bad name", "x@", "nfs-server"]),
)
def test_portreserve_files_read_cleanly_and_convert_to_valid_toml(lines, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name[:250]
        path.write_text("\n".join(lines) + "\n", errors="surrogateescape")
        try:
            entries = read_file(path)
        except PortreserveError as exc:
            assert CLEAN.match(str(exc)) and str(exc).startswith(str(path))
            return
        try:
            config.loads(to_toml(entries), "converted.toml")
        except config.ConfigError as exc:
            assert all(CLEAN.match(p) for p in exc.problems)


class _Scratch(type(Path())):
    monkeypatch: pytest.MonkeyPatch


@pytest.fixture(scope="module")
def scratch():
    """One file rewritten per example (temporary directories per example cost more than the
    parse; /etc/services is read only when a service name is looked up)."""
    mp = pytest.MonkeyPatch()
    with tempfile.TemporaryDirectory() as tmp:
        path = _Scratch(tmp, "portguard.toml")
        path.monkeypatch = mp
        yield path
    mp.undo()


# ---- files that are not plain files -----------------------------------------------------------


def _special(tmp: Path, kind: str) -> Path:
    path = tmp / "portguard.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "loop":
        path.symlink_to(tmp / "portguard.toml")
    elif kind == "dangling-dropin":
        path.write_text("")
        (tmp / "conf.d").mkdir()
        (tmp / "conf.d" / "x.toml").symlink_to(tmp / "nowhere")
        path = tmp / "portguard.toml"
    elif kind == "oversized":
        path.write_bytes(b"#" * (config.MAX_FILE_BYTES + 1))
    elif kind == "nested":
        path.write_text("a = " + "[" * 100000 + "]" * 100000 + "\n")
    return path


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "loop", "oversized", "nested"])
def test_files_that_are_not_plain_config_are_refused_with_file_and_line(
    tmp_path, kind, monkeypatch
):
    path = _special(tmp_path, kind)
    code, applied, output = _run_apply(path, monkeypatch)
    assert code == 2 and not applied, output
    where = f"{path}: Too many levels of symbolic links" if kind == "loop" else f"{path}:1:"
    assert where in output and "Traceback" not in output


def test_a_dangling_dropin_symlink_is_skipped_not_fatal(tmp_path, monkeypatch):
    path = _special(tmp_path, "dangling-dropin")
    code, applied, output = _run_apply(path, monkeypatch)
    assert code == 0 and len(applied) == 1, output


def test_an_unreadable_file_is_refused_with_file_and_line(tmp_path, monkeypatch):
    path = tmp_path / "portguard.toml"
    path.write_text("[guard]\n")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(config.os, "open", refuse)  # chmod 0 does not stop root
    code, applied, output = _run_apply(path, monkeypatch)
    assert code == 2 and not applied
    assert f"{path}:1: cannot read: Permission denied" in output


# ---- long cgroup paths ---------------------------------------------------------------------------


def _path_of(length: int) -> str:
    path = ""
    while len(path) < length:
        path += "/" + "c" * min(100, length - len(path) - 1)
    return path


@pytest.mark.parametrize("length", [254, 255, 256, 300, 4000])
def test_long_owner_paths_are_refused_never_truncated(length):
    owner = _path_of(length)
    assert len(owner) == length
    text = f'[[reserve]]\nports = ["7000"]\ncgroup = "{owner}"\n'
    if length <= config.MAX_PATH_BYTES:
        cfg = config.loads(text, "p.toml")
        built = plan.build(cfg.settings, owners.resolve(cfg), (), LIMITS)
        assert built.paths == (owner,)
        return
    with pytest.raises(config.ConfigError) as exc:
        config.loads(text, "p.toml")
    assert exc.value.problems == [
        (
            f"p.toml:3: owner cgroup path is {length} bytes; at most 254 fit "
            "the kernel's key (a truncated key could match another cgroup)"
        )
    ]


def test_a_resolved_owner_path_too_long_for_the_key_is_refused_by_the_plan():
    # units and slices resolve to paths after parsing: the plan checks again
    # (as if x.service resolved there); the error names the line that named the unit
    cfg = config.loads('[[reserve]]\nports = ["7000"]\nunit = "x.service"\n', "p.toml")
    block, [unit] = cfg.blocks[0], cfg.blocks[0].owners
    resolved = owners.Block(
        block.ports, (owners.Owner(_path_of(300), unit.name, unit.origin),), False, block.origin
    )
    with pytest.raises(
        config.ConfigError, match=r"^p.toml:3: owner cgroup .* is 300 bytes; at most 254"
    ):
        plan.build(cfg.settings, [resolved], (), LIMITS)

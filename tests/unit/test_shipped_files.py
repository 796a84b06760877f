"""What the package installs besides the code: the conffile, the man pages, bash completion.

The command line and the configuration keys are read from guard.cli and guard.policy.config, so an
option or key added there without its documentation fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from guard import cli, reports
from guard import commands as command_core
from guard.kernel.layout import LIMITS
from guard.policy import config, owners, plan
from guard.policy.defaults import default_policy_text

ROOT = Path(__file__).resolve().parents[2]
CONFFILE = ROOT / "docs" / "portguard.toml"
MAN_DIR = ROOT / "docs" / "man"
MAN_PAGES = sorted(MAN_DIR.glob("*.[1-8]"))
PORTGUARD_8 = MAN_DIR / "portguard.8"
PORTGUARD_TOML_5 = MAN_DIR / "portguard.toml.5"
COMPLETION = ROOT / "docs" / "completion" / "portguard"

# Commented-out settings and examples are "#" followed directly by a key or a table header;
# explanations are "# " followed by text.
COMMENTED_OUT = re.compile(r"^#(?=[A-Za-z\[])")


def visible_options(command: click.Command) -> list[str]:
    """Every spelling of every option the user can see (hidden testing options left out), as
    the command sees it under portguard (the group's context settings give -h to all)."""
    group = click.Context(cli.main, **cli.main.context_settings)
    context = (
        group
        if command is cli.main
        else click.Context(command, parent=group, **command.context_settings)
    )
    return [
        name
        for param in command.get_params(context)
        if isinstance(param, click.Option) and not param.hidden
        for name in (*param.opts, *param.secondary_opts)
    ]


def commands() -> dict[str, click.Command]:
    return dict(cli.main.commands)


def roff_text(path: Path) -> str:
    """The man page source with roff's escaped hyphens and font changes made plain."""
    text = path.read_text(encoding="utf-8").replace("\\-", "-")
    return re.sub(r"\\f[BIRP]|\\&", "", text)


# ---- the conffile -------------------------------------------------------------------------------


@pytest.fixture
def hermetic(tmp_path, monkeypatch):
    """No portreserve files and a fixed set of installed units, so both loads see the same
    machine: cups and rsync installed, tinc as a template, the rest absent."""
    monkeypatch.setattr(config, "PORTRESERVE_DIR", str(tmp_path / "no-portreserve"))
    units = tmp_path / "units"
    units.mkdir()
    for name in ("cups.service", "rsync.service", "tinc@.service"):
        (units / name).write_text("[Service]\nExecStart=/bin/true\n")
    (units / "cups.socket").write_text("[Socket]\nListenStream=631\n")
    monkeypatch.setenv(owners.UNIT_DIRS_ENV, str(units))
    return tmp_path


def planned(cfg: config.Config) -> plan.Plan:
    return plan.build(cfg.settings, owners.resolve(cfg), owners.extra_owners(cfg), LIMITS)


def test_shipped_conffile_gives_exactly_the_default_policy(hermetic):
    shipped = config.load([CONFFILE])
    without_files = config.load([])

    assert shipped.blocks == without_files.blocks
    assert shipped.blocks, "the default policy reserves something"
    assert shipped.settings._replace(use_defaults=None) == without_files.settings
    shipped_plan, default_plan = planned(shipped), planned(without_files)
    assert shipped_plan.ports, "cups and rsync are installed here: their ports are reserved"
    assert shipped_plan._replace(settings=default_plan.settings) == default_plan


def test_shipped_conffile_keeps_the_default_policy_under_a_dropin(hermetic, tmp_path):
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    main = etc / "portguard.toml"
    main.write_bytes(CONFFILE.read_bytes())
    dropin = etc / "conf.d" / "50-app.toml"
    dropin.write_text('[[reserve]]\nports = [8080]\ncgroup = "/app"\n')

    loaded = config.load(config.config_files(main))

    assert loaded.blocks == config.load([dropin]).blocks + config.load([]).blocks


def _uncommented(text: str) -> str:
    return "\n".join(COMMENTED_OUT.sub("", line) for line in text.splitlines())


def test_conffile_shows_every_guard_setting_with_its_default_value():
    guard_part = CONFFILE.read_text().split("#[[reserve]]", 1)[0]
    settings = config.loads(_uncommented(guard_part), str(CONFFILE)).settings

    shown = set(re.findall(r"^#?(\w+) =", guard_part, re.MULTILINE))
    assert shown == set(config.GUARD_KEYS)
    assert settings == config.Settings(use_defaults=True)


def test_conffile_examples_are_valid_and_use_every_reserve_key(tmp_path):
    services = tmp_path / "services"
    services.write_text("ipp\t\t631/tcp\n")
    text = CONFFILE.read_text()

    examples = config.loads(_uncommented(text), str(CONFFILE), services_file=services)

    assert len(examples.blocks) >= 3
    for key in config.RESERVE_KEYS:
        assert re.search(rf"\b{key}\b", text), f"{key} is not mentioned in {CONFFILE.name}"


# ---- man pages ----------------------------------------------------------------------------------


def test_there_are_the_three_man_pages():
    assert [p.name for p in MAN_PAGES] == ["portguard.8", "portguard.toml.5", "portrelease.8"]


@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_man_page_formats_without_warnings(page):
    if shutil.which("man"):
        command = ["man", "--warnings", "-l", "-Tutf8", str(page)]
    elif shutil.which("groff"):
        command = ["groff", "-t", "-man", "-ww", "-z", str(page)]
    else:
        pytest.skip("neither man nor groff installed (apt-get install man-db groff-base)")
    result = subprocess.run(
        command, capture_output=True, text=True, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0
    assert result.stderr == ""


def _synopsis_blocks(text: str) -> list[str]:
    return re.findall(r"^\.SY portguard\n(.*?)^\.YS", text, re.MULTILINE | re.DOTALL)


def test_portguard_8_synopsis_lists_every_command_with_its_options():
    text = roff_text(PORTGUARD_8)
    by_command = {}
    for block in _synopsis_blocks(text):
        words = re.findall(r"[-\w]+", block)
        command = next((w for w in words if w in commands()), None)
        if command:
            by_command[command] = set(re.findall(r"(?<![\w-])--?[a-z][-a-z]*", block))

    assert set(by_command) == set(commands())
    for name, command in commands().items():
        expected = set(visible_options(command)) - {"-h", "--help"}
        assert expected <= by_command[name], f"portguard.8 synopsis of {name}"
    # options that act and exit (--help, --version) have a synopsis line of their own
    acting = {n for p in cli.main.params if p.is_eager for n in (*p.opts, *p.secondary_opts)}
    global_options = set(visible_options(cli.main)) - {"-h", "--help"} - acting
    for name in ("apply", "status", "check", "monitor", "remove"):
        assert global_options <= by_command[name]


def test_portguard_8_describes_every_command_and_option():
    text = roff_text(PORTGUARD_8)
    commands_section = text.split(".SH COMMANDS", 1)[1].split("\n.SH ", 1)[0]
    for name, command in commands().items():
        assert re.search(rf"^\.TP\n\.B {re.escape(name)}\b", commands_section, re.MULTILINE), name
        for option in visible_options(command):
            assert re.search(rf"(?<![\w-]){re.escape(option)}\b", text), f"{name} {option}"
    options_section = text.split(".SH OPTIONS", 1)[1].split("\n.SH ", 1)[0]
    for option in visible_options(cli.main):
        assert option in options_section


def test_portguard_8_documents_every_exit_code():
    exit_section = roff_text(PORTGUARD_8).split(".SH EXIT STATUS", 1)[1].split("\n.SH ", 1)[0]
    codes = {0} | {
        value
        for module in (cli, command_core, reports)
        for name, value in vars(module).items()
        if name.startswith("EXIT_")
    }
    assert set(map(int, re.findall(r"^\.B (\d+)$", exit_section, re.MULTILINE))) == codes


def _entry_names(section: str) -> set[str]:
    """The names an entry list defines: the words of each ".TP" heading, defaults left out
    (".BR cgroup \", \" cgroups" names cgroup and cgroups)."""
    headings = re.findall(r"^\.TP\n\.BR? (.+)$", section, re.MULTILINE)
    return {word for line in headings for word in re.findall(r"\w+", re.sub(r'" = .*"', "", line))}


def test_portguard_toml_5_documents_every_key():
    text = roff_text(PORTGUARD_TOML_5)
    guard_section = text.split(".SH THE [guard] TABLE", 1)[1].split("\n.SH ", 1)[0]
    reserve_section = text.split(".SH THE [[reserve]] TABLE", 1)[1].split("\n.SH ", 1)[0]

    assert _entry_names(guard_section) == set(config.GUARD_KEYS)
    assert _entry_names(reserve_section) == config.RESERVE_KEYS


def test_portguard_toml_5_lists_the_default_policy_and_its_defaults():
    text = roff_text(PORTGUARD_TOML_5)
    table = text.split(".TS", 1)[1].split(".TE", 1)[0]
    default = config.loads(default_policy_text())
    for block in default.blocks:
        for port_range, _ in block.ports:
            assert str(port_range.first) in table
        for owner in block.owners:
            assert owner.name in table
    for key, value in config.Settings()._asdict().items():
        if isinstance(value, float):
            assert f'.BR {key} " = {value:g}"' in text, key
        elif value is not None and not isinstance(value, bool):
            assert f'.BR {key} " = \\(dq{value}\\(dq"' in text, key
        elif isinstance(value, bool):
            assert f'.BR {key} " = {str(value).lower()}"' in text, key


# ---- bash completion ----------------------------------------------------------------------------


def test_completion_is_valid_bash():
    subprocess.run(["bash", "-n", str(COMPLETION)], check=True)


def complete(*words: str, cwd: Path | None = None) -> list[str]:
    """What _portguard offers when TAB is pressed after ``words`` (the last one is the word
    being completed)."""
    script = (
        f'source "{COMPLETION}"\n'
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=()\n'
        "_portguard\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "-c", script, "bash", "portguard", *words],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    )
    return [line for line in result.stdout.splitlines() if line]


def test_completion_offers_every_command_and_global_option():
    assert set(complete("")) == set(commands())
    assert set(complete("-")) == set(visible_options(cli.main))


@pytest.mark.parametrize("name", sorted(cli.main.commands))
def test_completion_offers_every_option_of_each_command(name):
    assert set(complete(name, "-")) == set(visible_options(cli.main.commands[name]))


def test_completion_offers_files_for_config_and_directories_for_import(tmp_path):
    (tmp_path / "mine.toml").write_text("")
    (tmp_path / "portreserve.d").mkdir()

    assert complete("--config", "m", cwd=tmp_path) == ["mine.toml"]
    assert complete("--config", "=", "m", cwd=tmp_path) == ["mine.toml"]
    assert complete("import-portreserve", "", cwd=tmp_path) == ["portreserve.d"]
    assert complete("--config", "mine.toml", "check", "", cwd=tmp_path) == []
    assert complete("monitor", "--count", "") == []

"""Mutation probe: for every mechanism a guarantee rests on, remove it and name the tests that
must fail (issue 23). Not part of the test suite: run it after changing a mechanism or a test.

    sudo .venv/bin/python -m tests.mutants                    # every mutant, its own run count
    sudo .venv/bin/python -m tests.mutants grace-gone --runs 20
    sudo .venv/bin/python -m tests.mutants --list             # mechanisms, mutants, tests
    sudo .venv/bin/python -m tests.mutants --baseline ...     # the same tests, unmutated, first

Each mutant is one exact piece of text in one file and its replacement. For each run the tree
(the files git tracks or would track, uncommitted edits included) is copied to a scratch
directory, the mutant is applied there and the mutant's tests are run there with pytest. A
changed BPF source is rebuilt by the tests themselves, into an object cache inside the scratch
directory (PORTGUARD_CACHE_DIR), which goes with it: a mutated object never lands where
portguard or another test run would load it. A mutant whose text is no longer found exactly
once is reported STALE (fix the mutant), never as survived. A mutant none of whose tests fail
in a run SURVIVED that run: the mechanism is protected by nothing but review. A mutant marked
equivalent (another mechanism alone keeps the guarantee, so no test can fail) runs only when
named. After a run of a BPF mutant the probe checks that no object of the mutated sources
appeared in /var/cache/portguard.

Prints mechanism → mutant → test → runs failed/runs, and exits 1 when a mutant survived a run
or is stale.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from guard.kernel.objects import DEFAULT_CACHE_DIR, SOURCES, host_target
from guard.kernel.sources import sha256
from tests.debs import copy_tree

ROOT = Path(__file__).resolve().parents[1]
STRIDE_1 = {"PORTGUARD_FAULT_STRIDE": "1"}  # the fault walks kill at every step, not every 4th

FAULTS = "tests/kernel/test_faults.py::"
GUARD = "tests/kernel/test_guard.py::"
HARDENING = "tests/kernel/test_hardening.py::"
OBSERVABILITY = "tests/kernel/test_observability.py::"
QUICK = "tests/kernel/test_quick_reapply.py::"


class Mutant(NamedTuple):
    name: str
    mechanism: str
    file: str
    text: str  # found exactly once in file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids that must fail
    runs: int = 3
    env: dict[str, str] = {}
    # Why no test can fail: another mechanism alone keeps the guarantee. Such a mutant runs
    # only when named, and surviving is then what is expected of it.
    equivalent: str = ""


MUTANTS = [
    # ---- the re-apply's grace period --------------------------------------------------------
    Mutant(
        "grace-gone",
        "grace period before the old slot is cleared",
        "guard/kernel/libbpf.py",
        "    a throwaway outer map gives the same guarantee here, on every kernel"
        ' configuration."""\n',
        "    a throwaway outer map gives the same guarantee here, on every kernel"
        ' configuration."""\n    return\n',
        (
            "tests/kernel/test_grace_period.py::"
            "test_reapply_empties_the_old_slot_only_after_a_bind_running_at_the_flip_has_finished",
        ),
        runs=20,
    ),
    Mutant(
        "grace-after-first-delete",
        "grace period before the old slot is cleared",
        "guard/kernel/slots.py",
        "        if keys and readers_gone is not None:\n"
        "            readers_gone()\n"
        "            readers_gone = None\n"
        "        m.delete_many(keys)\n",
        "        m.delete_many(keys)\n"
        "        if keys and readers_gone is not None:\n"
        "            readers_gone()\n"
        "            readers_gone = None\n",
        (
            "tests/kernel/test_grace_period.py::"
            "test_reapply_empties_the_old_slot_only_after_a_bind_running_at_the_flip_has_finished",
            "tests/unit/test_slots.py::"
            "test_reapply_flips_once_and_clears_the_old_slot_only_after_its_readers_are_gone",
        ),
        runs=20,
    ),
    # ---- the bind rule (bpf/guard.bpf.c) ----------------------------------------------------
    Mutant(
        "netns-unchecked",
        "only the guarded network namespace is guarded",
        "bpf/guard.bpf.c",
        "return !g->cfg->netns_cookie || bpf_get_netns_cookie(ctx) == g->cfg->netns_cookie;",
        "return 1;",
        (GUARD + "test_other_network_namespaces_are_not_guarded",),
    ),
    Mutant(
        "owner-without-subcgroups",
        "an owner admits its sub-cgroups",
        "bpf/guard.bpf.c",
        "? bpf_get_current_ancestor_cgroup_id(level)",
        "? bpf_get_current_cgroup_id()",
        (GUARD + "test_stranger_gets_eaddrinuse_and_owner_and_its_subcgroups_bind",),
    ),
    Mutant(
        "udp-unguarded",
        "TCP and UDP are guarded",
        "bpf/guard.bpf.c",
        "if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)",
        "if (protocol != IPPROTO_TCP)",
        (GUARD + "test_stranger_gets_eaddrinuse_and_owner_and_its_subcgroups_bind",),
    ),
    Mutant(
        "set-retval-dropped",
        "refusals see deny_errno (EADDRINUSE: bindresvport moves on)",
        "bpf/guard.bpf.c",
        "\t\tbpf_set_retval(-(int)g.cfg->deny_errno);\n",
        "\t\t;\n",
        (
            GUARD + "test_stranger_gets_eaddrinuse_and_owner_and_its_subcgroups_bind",
            GUARD + "test_bindresvport_skips_reserved_ports_and_succeeds_elsewhere",
        ),
    ),
    Mutant(
        "audit-enforcing",
        'mode = "audit" allows',
        "bpf/guard.bpf.c",
        "\tif (audit)\n\t\treturn ALLOW;\n",
        "",
        (OBSERVABILITY + "test_audit_mode_allows_counts_and_reports_with_verdict_audit",),
    ),
    Mutant(
        "double-counting",
        "refusals counted exactly",
        "bpf/guard.bpf.c",
        # the cgroup road's (the security_socket_bind program's follows `return 0;`)
        "\t\treturn ALLOW;\n\tcount(&denied, protocol, port);\n",
        "\t\treturn ALLOW;\n\tcount(&denied, protocol, port);\n\tcount(&denied, protocol, port);\n",
        (
            OBSERVABILITY
            + "test_denied_counter_equals_the_refused_binds_of_several_parallel_processes",
        ),
    ),
    Mutant(
        "counter-not-atomic",
        "refusals counted exactly",
        "bpf/guard.bpf.c",
        "\tif (count) {\n\t\t__sync_fetch_and_add(count, 1);\n",
        "\tif (count) {\n\t\t*count += 1;\n",
        (
            "tests/unit/test_object_code.py::"
            "test_no_program_adds_to_memory_with_a_plain_load_add_store",
            OBSERVABILITY
            + "test_denied_counter_equals_the_refused_binds_of_several_parallel_processes",
        ),
    ),
    Mutant(
        "tracker-mkdir-blind",
        "owners followed across restarts in the kernel (cgroup_mkdir)",
        "bpf/guard.bpf.c",
        "\t\t\tbpf_map_update_elem(&owner_ids, &ik, idx, BPF_ANY);\n",
        "",
        (
            GUARD + "test_owner_restart_gets_the_new_cgroup_id_with_no_process_running",
            GUARD + "test_owner_cgroup_created_after_apply_owns_the_port_at_once",
        ),
    ),
    Mutant(
        "tracker-follows-v1",
        "hybrid layouts: cgroup v1 directories are never owners",
        "bpf/guard.bpf.c",
        "\tif (BPF_CORE_READ(cgrp, root, hierarchy_id) != 0)"
        "  /* cgroup v1 hierarchies: ids collide */\n"
        "\t\treturn 0;\n",
        "",
        (GUARD + "test_a_cgroup_v1_directory_at_an_owners_path_is_not_the_owner",),
    ),
    Mutant(
        "tracker-rmdir-blind",
        "a removed owner cgroup is forgotten (cgroup_rmdir)",
        "bpf/guard.bpf.c",
        "\t\t\tbpf_map_delete_elem(&owner_ids, &ik);\n",
        "",
        (GUARD + "test_an_owner_recreated_is_found_by_its_new_id_and_the_old_one_is_forgotten",),
    ),
    Mutant(
        "tracker-truncates",
        "long cgroup paths never match an owner by truncation",
        "bpf/guard.bpf.c",
        "if (len <= 0 || len >= PG_PATH_MAX)",
        "if (len <= 0)",
        (HARDENING + "test_a_300_byte_cgroup_path_never_matches_an_owner_by_truncation",),
        equivalent="a truncated key holds 255 bytes, and no owner path has more than 254 "
        "(owner-path-limit-lifted): the truncation is refused twice",
    ),
    Mutant(
        "owner-path-limit-lifted",
        "long cgroup paths never match an owner by truncation",
        "guard/policy/config.py",
        "MAX_PATH_BYTES = 254",
        "MAX_PATH_BYTES = 400",
        (
            HARDENING + "test_a_300_byte_cgroup_path_never_matches_an_owner_by_truncation",
            "tests/unit/test_config.py",
            "tests/unit/test_contract.py::test_config_refuses_paths_the_kernel_key_could_not_hold",
        ),
    ),
    Mutant(
        "contain-passes",
        "contain = true: a squatter can neither send nor receive",
        "bpf/guard.bpf.c",
        "\treturn g.cfg->mode == PG_MODE_AUDIT ? PASS : DROP;\n",
        "\treturn PASS;\n",
        (
            "tests/kernel/test_containment.py::test_contained_squatter_cannot_exchange_tcp_or_udp_traffic",
        ),
    ),
    # ---- autobind: the sysctl and its records -----------------------------------------------
    Mutant(
        "sysctl-not-written",
        "autobind kept off reserved ports (ip_local_reserved_ports)",
        "guard/kernel/sysctl.py",
        "        write(current | missing)\n",
        "        pass\n",
        (GUARD + "test_autobind_never_lands_on_a_reserved_port",),
    ),
    Mutant(
        "sysctl-not-restored",
        "apply puts missing sysctl entries back",
        "guard/kernel/apply.py",
        "        added = sysctl.add(maps.sysctl_added, wanted_ports)\n",
        "        added = False\n",
        (GUARD + "test_an_unchanged_reapply_puts_back_reserved_ports_taken_out_of_the_sysctl",),
    ),
    Mutant(
        "remove-takes-all-sysctl",
        "remove takes away only the entries apply added",
        "guard/kernel/apply.py",
        "    sysctl.release(added)  # the records go with their maps below\n",
        "    sysctl.release(added | sysctl.read())\n",
        (GUARD + "test_remove_restores_the_sysctl_keeping_what_was_there",),
    ),
    Mutant(
        "remove-leaves-sysctl",
        "remove takes away the entries apply added",
        "guard/kernel/apply.py",
        "    sysctl.release(added)  # the records go with their maps below\n",
        "",
        (
            GUARD + "test_remove_restores_the_sysctl_keeping_what_was_there",
            GUARD + "test_remove_leaves_no_links_pins_or_sysctl_entries",
        ),
    ),
    Mutant(
        "sysctl-written-before-recorded",
        "kill-safety: a port is recorded before it is added",
        "guard/kernel/sysctl.py",
        "        record(added, known, known | missing)  # first: a crash never forgets them\n"
        "        write(current | missing)\n"
        "        libbpf.step()\n",
        "        write(current | missing)\n"
        "        libbpf.step()\n"
        "        record(added, known, known | missing)\n",
        (FAULTS + "test_first_apply_killed_anywhere_leaves_no_guard_or_the_whole_guard",),
        runs=2,
        env=STRIDE_1,
    ),
    Mutant(
        "sysctl-forgotten-before-dropped",
        "kill-safety: a port is forgotten only after it is dropped",
        "guard/kernel/sysctl.py",
        "    release(stale)\n"
        "    record(added, known, known - stale)  # forgotten last: a crash only repeats"
        " the drop\n",
        "    record(added, known, known - stale)\n    release(stale)\n",
        (FAULTS + "test_reapply_killed_anywhere_leaves_the_old_guard_or_the_new",),
        runs=2,
        env=STRIDE_1,
    ),
    Mutant(
        "older-layout-records-lost",
        "upgrade: an older layout's sysctl records are carried over",
        "guard/kernel/apply.py",
        "    carried: set[int] = set()\n",
        "    return\n    carried: set[int] = set()\n",
        (
            HARDENING
            + "test_maps_of_an_older_layout_are_taken_over_and_removed_keeping_the_sysctl_records",
        ),
    ),
    Mutant(
        "legacy-hash-records-unread",
        "upgrade: records of layouts before the sysctl bitmap are read",
        "guard/kernel/sysctl.py",
        "    legacy = layout.SYSCTL_ADDED_HASH\n",
        "    return None\n    legacy = layout.SYSCTL_ADDED_HASH\n",
        (
            HARDENING + "test_an_older_layouts_hash_of_sysctl_records_is_carried_over_and_dropped",
            HARDENING + "test_remove_takes_away_what_an_older_layouts_hash_recorded",
        ),
    ),
    # ---- the atomic flip and what apply does around it --------------------------------------
    Mutant(
        "flip-before-fill",
        "atomic flip: the inactive slot is complete before the flip",
        "guard/kernel/apply.py",
        "    slots.fill_slot(maps, inactive, plan, cfg, cgroup_root)\n"
        "    sysctl.add(maps.sysctl_added, wanted_ports)\n"
        "    slots.flip(maps, inactive)\n",
        "    slots.flip(maps, inactive)\n"
        "    slots.fill_slot(maps, inactive, plan, cfg, cgroup_root)\n"
        "    sysctl.add(maps.sysctl_added, wanted_ports)\n",
        (FAULTS + "test_reapply_killed_anywhere_leaves_the_old_guard_or_the_new",),
        runs=2,
    ),
    Mutant(
        "links-attached-to-a-full-slot",
        "first apply: links attached while the active slot is empty",
        "guard/kernel/apply.py",
        "                if takeover:\n",
        "                if True:\n",
        (FAULTS + "test_first_apply_killed_anywhere_leaves_no_guard_or_the_whole_guard",),
        runs=2,
        env=STRIDE_1,
    ),
    Mutant(
        "remove-without-flip",
        "kill-safety: remove empties the active slot before it unpins the links",
        "guard/kernel/apply.py",
        "            slots.flip(maps, empty)  # no reservation from here on\n",
        "",
        (FAULTS + "test_remove_killed_anywhere_leaves_the_guard_or_nothing",),
        runs=2,
        env=STRIDE_1,
    ),
    Mutant(
        "counters-dropped-on-reapply",
        "counters kept by a re-apply that keeps the port",
        "guard/kernel/apply.py",
        "        counters.delete_many([k for k in counters.keys()"
        " if (k.proto, k.port) not in reserved])\n",
        "        counters.delete_many(list(counters.keys()))\n",
        (OBSERVABILITY + "test_counters_are_kept_by_a_reapply_that_keeps_the_port",),
    ),
    Mutant(
        "counters-not-carried",
        "counters carried over to new maps",
        "guard/kernel/apply.py",
        "    _carry_counters(others, maps)\n",
        "",
        (
            "tests/kernel/test_sizing.py::"
            "test_a_policy_that_outgrows_its_maps_gets_new_ones_and_keeps_its_counts",
        ),
    ),
    Mutant(
        "program-not-swapped",
        "a changed program is swapped into the links (bpf_link_update)",
        "guard/kernel/apply.py",
        "            elif prog is not None:\n"
        "                libbpf.update_link(links[name], prog)\n",
        "",
        ("tests/kernel/test_boot_path.py::test_a_changed_program_is_swapped_into_the_same_links",),
    ),
    Mutant(
        "meta-written-first",
        "kill-safety: the object digest is written last",
        "guard/kernel/apply.py",
        "                _carry_sysctl_records(pins, maps)\n"
        "                if not readers and not empty:\n",
        "                _carry_sysctl_records(pins, maps)\n"
        "                maps.meta.update(0, layout.Meta(self.digest))\n"
        "                if not readers and not empty:\n",
        (FAULTS + "test_program_swap_killed_anywhere_leaves_the_old_guard_or_the_new",),
        runs=2,
        env=STRIDE_1,
    ),
    Mutant(
        "reused-maps-taken-as-empty",
        "apply: only maps its own load made skip the clearing of slots and counters",
        "guard/kernel/apply.py",
        "                empty = not reused  # maps this load made: both slots and the counters"
        " empty\n",
        "                empty = True\n",
        (
            "tests/kernel/test_maps.py::"
            "test_programs_loaded_anew_over_the_pinned_maps_leave_only_the_new_plan_in_them",
        ),
        runs=1,
    ),
    Mutant(
        "unchanged-reapply-rewrites",
        "re-applying an unchanged configuration writes nothing",
        "guard/kernel/apply.py",
        "    if unchanged:\n",
        "    if False:\n",
        (
            GUARD + "test_reapply_with_the_same_config_changes_nothing",
            "tests/unit/test_slots.py::test_reapply_of_the_same_plan_writes_no_slot",
        ),
    ),
    Mutant(
        "cgroup-namespace-allowed",
        "apply refuses to run inside a cgroup namespace",
        "guard/kernel/cgroups.py",
        "    if inode != INITIAL_CGROUP_NAMESPACE_INO:\n",
        "    if False:\n",
        (
            "tests/systemd/test_cgroup_namespace.py::"
            "test_namespace_check_refuses_other_namespaces_and_passes_without_namespaces",
        ),
    ),
    # ---- the compiled plan: a shortcut, never another answer ---------------------------------
    Mutant(
        "compiled-plan-fingerprint-ignored",
        "status, check and apply use a compiled plan only while every input is unchanged",
        "guard/fingerprint.py",
        " or fingerprint(files, dirs)[0] != seen:\n",
        ":\n",
        (
            "tests/kernel/test_compiled_plan.py::test_files_edited_after_the_apply_are_read_again",
            "tests/kernel/test_compiled_plan.py::"
            "test_an_unchanged_reapply_from_the_record_parses_nothing_and_an_edit_is_applied",
            "tests/unit/test_compiled.py::test_any_change_of_an_input_makes_the_record_unusable",
        ),
    ),
    Mutant(
        "compiled-plan-racy-recorded",
        "an input changed as apply began to read is never recorded",
        "guard/policy/compiled.py",
        "    if newest > since_ns - RACY_NS:\n",
        "    if False:\n",
        (
            "tests/unit/test_compiled.py::"
            "test_an_input_changed_as_apply_began_to_read_is_never_recorded",
        ),
    ),
    # ---- upgrades and stale pins ------------------------------------------------------------
    Mutant(
        "takeover-links-before-fill",
        "upgrade: new maps complete before the links read them",
        "guard/kernel/apply.py",
        "                    readers, takeover = [], bool(bind_links)\n",
        "                    readers, takeover = [], False\n",
        (FAULTS + "test_layout_takeover_killed_anywhere_never_leaves_a_family_unguarded",),
        runs=2,
        env=STRIDE_1,
    ),
    Mutant(
        "half-created-maps-trusted",
        "stale pins: a half-created set of maps is never used",
        "guard/kernel/pins.py",
        "                if fd is None:\n                    return None\n",
        "                if fd is None:\n                    continue\n",
        (
            HARDENING + "test_half_created_maps_and_stale_staged_links_are_taken_over"
            "_while_the_links_enforce",
        ),
    ),
    Mutant(
        "staged-link-left",
        "stale pins: a killed run's staged tracker is replaced",
        "guard/kernel/apply.py",
        "            libbpf.unpin(self.pins.staged_link(name))"
        "  # a killed run's, never switched to\n",
        "",
        (
            HARDENING + "test_half_created_maps_and_stale_staged_links_are_taken_over"
            "_while_the_links_enforce",
        ),
    ),
    Mutant(
        "foreign-link-pin-trusted",
        "stale pins: a foreign pin under a link's name is refused",
        "guard/kernel/apply.py",
        '            if kind != "link" or not _expected_link(name, libbpf.link_info(fd)):\n',
        "            if False:\n",
        (
            HARDENING
            + "test_a_foreign_pin_under_a_link_name_is_one_clear_sentence_and_the_guard_stays",
        ),
    ),
    Mutant(
        "pins-world-readable",
        "pins are root-only",
        "guard/kernel/apply.py",
        "            os.chmod(pins.root, 0o700)\n",
        "            os.chmod(pins.root, 0o755)\n",
        (HARDENING + "test_pins_are_root_only_nobody_can_neither_open_nor_unpin_them",),
    ),
    Mutant(
        "quick-record-not-forgotten",
        "unchanged re-apply: the guard record goes before anything changes the guard",
        "guard/kernel/apply.py",
        "        forget_record(pins.root)\n        try:\n            os.makedirs(pins.root,",
        "        try:\n            os.makedirs(pins.root,",
        (QUICK + "test_an_apply_of_other_files_killed_half_way_is_never_vouched_for",),
        runs=2,
    ),
    Mutant(
        "quick-snapshot-ignored",
        "unchanged re-apply: the pinned links and maps are the ones the record names",
        "guard/quick.py",
        "    if snapshot.take(pin_dir) != snap:\n",
        "    if False:\n",
        (QUICK + "test_a_link_taken_away_is_put_back_by_the_full_path",),
        runs=2,
    ),
    Mutant(
        "quick-sysctl-ignored",
        "unchanged re-apply: the reserved ports are still in ip_local_reserved_ports",
        "guard/quick.py",
        "    if not {port for _, port in reserved} <= _reserved_ports():\n",
        "    if False:\n",
        (QUICK + "test_a_port_taken_out_of_the_sysctl_is_put_back",),
        runs=2,
    ),
    Mutant(
        "quick-sockets-ignored",
        "unchanged re-apply: the sockets on reserved ports are the ones apply found",
        "guard/quick.py",
        "    if reserved_sockets(reserved) != held_then:\n",
        "    if False:\n",
        (QUICK + "test_a_new_socket_on_a_reserved_port_takes_the_full_path_once",),
        runs=2,
    ),
    Mutant(
        "quick-netns-ignored",
        "unchanged re-apply: the same network namespace",
        "guard/quick.py",
        "    netns = (snapshot.netns_inode(), snapshot.netns_cookie())\n",
        "    netns = None\n",
        (QUICK + "test_another_network_namespace_takes_the_full_path",),
        runs=2,
    ),
    Mutant(
        "fingerprint-without-ctime",
        "compiled plan: a copy that keeps the old mtime is still a change",
        "guard/fingerprint.py",
        "link.st_size, link.st_mtime_ns, link.st_ctime_ns)\n",
        "link.st_size, link.st_mtime_ns, 0)\n",
        ("tests/unit/test_compiled.py",),
        runs=1,
    ),
    Mutant(
        "masked-unit-by-device-times",
        "compiled plan: a unit masked by a link to /dev/null is known by the link, not the device",
        "guard/fingerprint.py",
        "            if target.st_mode & 0o170000 not in (0o100000, 0o040000):\n",
        "            if False:\n",
        (
            "tests/unit/test_compiled.py::test_a_unit_masked_by_a_link_to_a_device_is_known_by_that_alone",
        ),
        runs=1,
    ),
    Mutant(
        "volatile-by-stat",
        "compiled plan: units generated anew with the same content keep the boot's plan",
        "guard/fingerprint.py",
        '        if (path + "/").startswith(volatile):\n',
        "        if False:\n",
        ("tests/unit/test_compiled.py",),
        runs=1,
    ),
    Mutant(
        "object-digest-unchecked",
        "a stale or damaged object is never loaded",
        "guard/kernel/objects.py",
        "        return _read(sidecar_of(path)).decode().strip() == file_digest(path)\n",
        "        return True\n",
        (
            "tests/kernel/test_boot_path.py::"
            "test_an_object_whose_sidecar_digest_does_not_match_is_never_loaded",
            "tests/kernel/test_boot_path.py::test_a_damaged_cached_object_is_rebuilt_before_loading",
        ),
    ),
    # ---- the minimal BTF (guard/kernel/corebtf.py) ---------------------------------------
    Mutant(
        "core-btf-key-without-build-id",
        "a minimal BTF made on another kernel is never taken (its offsets could differ)",
        "guard/kernel/corebtf.py",
        '        found = b"build-id:" + found.hex().encode()\n',
        '        found = b"build-id"\n',
        (
            "tests/unit/test_corebtf.py::test_another_kernel_gets_another_file",
            "tests/unit/test_corebtf.py::test_a_file_made_on_another_kernel_is_not_offered",
        ),
        runs=1,
    ),
    Mutant(
        "core-btf-no-fallback",
        "a minimal BTF libbpf refuses never fails an apply: the kernel's BTF serves",
        "guard/kernel/libbpf.py",
        "        except BpfError:  # a damaged or foreign minimal BTF",
        "        except ZeroDivisionError:  # a damaged or foreign minimal BTF",
        (
            "tests/kernel/test_core_btf.py::"
            "test_a_minimal_btf_libbpf_refuses_falls_back_to_the_kernels_and_is_made_anew",
        ),
        runs=1,
    ),
]


def matches(mutant: Mutant) -> int:
    return (ROOT / mutant.file).read_text().count(mutant.text)


OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)(?: - (.*))?")


def run_tests(tree: Path, tests: tuple[str, ...], env: dict[str, str]) -> dict[str, str]:
    """Run the tests in the tree. For each test (a node id, or a file: all its tests):
    FAILED or ERROR when one of its tests did, with pytest's reason, SKIPPED when one was
    skipped and none failed, else PASSED."""
    cache = tree / ".objects"  # built objects stay in the scratch tree, and go with it
    run_env = {
        **os.environ,
        **env,
        "PORTGUARD_CACHE_DIR": str(cache),
        "PYTHONDONTWRITEBYTECODE": "1",
        "COLUMNS": "1000",  # pytest shortens the summary's reasons to the terminal width
    }
    run_env.pop("PYTHONPATH", None)
    # python -m from the tree imports the tree's guard and tests (before this checkout's
    # editable install), and so do the tests' `python -m guard` children, run from REPO
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests]
    imported = subprocess.run(
        [sys.executable, "-c", "import guard; print(guard.__file__)"],
        cwd=tree,
        env=run_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(imported).is_relative_to(tree):
        raise SystemExit(f"the scratch run would import {imported}, not the scratch tree's guard")
    proc = subprocess.run(cmd, cwd=tree, env=run_env, capture_output=True, text=True)
    found = [m.groups() for line in proc.stdout.splitlines() if (m := OUTCOME.match(line))]
    outcomes: dict[str, str] = {}
    for test in tests:
        mine = [
            (outcome, reason)
            for outcome, node, reason in found
            if node == test or node.startswith((test + "::", test + "[", test.rstrip("/") + "/"))
        ]
        if not mine:  # not collected (a mutant that breaks an import): it did not pass
            outcomes[test] = f"ERROR (not run: {proc.stdout[-150:].strip()})"
            continue
        for wanted in ("FAILED", "ERROR", "SKIPPED", "PASSED"):
            reasons = [reason for outcome, reason in mine if outcome == wanted]
            if reasons:
                reason = next((r for r in reasons if r), "")
                outcomes[test] = f"{wanted} ({reason[:150]})" if reason else wanted
                break
        else:
            outcomes[test] = mine[0][0]
    return outcomes


def run_mutant(mutant: Mutant | None, tests: tuple[str, ...], env: dict[str, str]):
    """One run in a fresh scratch copy (unmutated when mutant is None)."""
    with tempfile.TemporaryDirectory(prefix="portguard-mutant-") as tmp:
        tree = Path(tmp)
        copy_tree(ROOT, tree)
        if mutant is not None:
            path = tree / mutant.file
            path.write_text(path.read_text().replace(mutant.text, mutant.replacement, 1))
        outcomes = run_tests(tree, tests, env)
        leaked = Path(DEFAULT_CACHE_DIR) / f"guard-{source_digest(tree / 'bpf')}.o"
        if mutant is not None and mutant.file.startswith("bpf/") and leaked.exists():
            raise SystemExit(f"{leaked} was built from mutated sources: delete it")
        return outcomes


def source_digest(bpf_dir: Path) -> str:
    """The digest in the name objects.py gives the object of these sources, on this host."""
    digest = sha256()
    for name in SOURCES:
        digest.update((bpf_dir / name).read_bytes())
    if host_target() != "bpfel":
        digest.update(host_target().encode())
    return digest.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--runs", type=int, help="runs per mutant (default: the mutant's own)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--baseline", action="store_true", help="first run the same tests unmutated, once"
    )
    args = parser.parse_args()
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutants: {', '.join(unknown)} (see --list)")
    chosen = [known[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.mechanism}\n  {m.name} ({m.file}, {m.runs} runs)")
            for test in m.tests:
                print(f"    {test}")
        return 0
    if os.geteuid() != 0:
        parser.error("the kernel tests need root: sudo .venv/bin/python -m tests.mutants")

    bad = 0
    if args.baseline:  # the tests must pass without the mutants, with the mutants' settings
        for env in {tuple(sorted(m.env.items())) for m in chosen}:
            tests = tuple(dict.fromkeys(t for m in chosen if m.env == dict(env) for t in m.tests))
            outcomes = run_mutant(None, tests, dict(env))
            failing = {t: o for t, o in outcomes.items() if not o.startswith("PASSED")}
            print(
                f"baseline {dict(env) or ''}: {len(tests) - len(failing)} of {len(tests)} "
                "tests pass unmutated",
                flush=True,
            )
            for test, outcome in failing.items():
                print(f"    {outcome} {test}")
            bad += bool(failing)

    rows = []
    for m in chosen:
        if m.equivalent and m.name not in args.names:
            rows.append((m, None, f"equivalent, not run: {m.equivalent}", ""))
            continue
        found = matches(m)
        if found != 1:
            print(f"{m.name}: STALE ({m.file}: the text is found {found} times, not once)")
            rows.append((m, None, "STALE", ""))
            bad += 1
            continue
        runs = args.runs or m.runs
        failed = dict.fromkeys(m.tests, 0)
        killed = 0
        for i in range(runs):
            outcomes = run_mutant(m, m.tests, m.env)
            for test in m.tests:
                failed[test] += outcomes[test].startswith(("FAILED", "ERROR"))
            killed += any(outcomes[t].startswith(("FAILED", "ERROR")) for t in m.tests)
            print(f"{m.name}: run {i + 1}/{runs}:", flush=True)
            for test in m.tests:
                print(f"    {outcomes[test]} {test.rsplit('::', 1)[-1]}", flush=True)
        verdict = "killed" if killed == runs else "SURVIVED"
        if m.equivalent:
            verdict = f"{verdict} (equivalent: {m.equivalent})"
        else:
            bad += killed < runs
        for test in m.tests:
            rows.append((m, test, verdict, f"{failed[test]}/{runs}"))

    print("\nmechanism | mutant | test | runs failed/runs | verdict")
    print("--- | --- | --- | --- | ---")
    for m, test, verdict, count in rows:
        short = test.replace("tests/", "") if test else "-"
        print(f"{m.mechanism} | {m.name} | {short} | {count} | {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

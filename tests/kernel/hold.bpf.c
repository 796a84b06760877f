// SPDX-License-Identifier: GPL-2.0
/*
 * Test helper for tests/kernel/test_grace_period.py, not part of portguard: a cgroup bind4
 * program that stays inside one bind until user space releases it. Like every program of its
 * kind it runs under rcu_read_lock, so while it is held no RCU grace period can complete:
 * the window between a bind program reading state.active and finishing its lookups, made as
 * long as the test needs instead of a few hundred nanoseconds.
 *
 * hold_state: [ENTERED] binds that came in, [RELEASE] set by user space to let them go,
 * [LEFT] binds that went out, [TURNS] turns the last one waited. It gives up on its own after
 * 1 << 13 turns of 1 << 20 checks (about 8 s here), so a broken test never wedges a CPU.
 *
 * While it is held, everything on the machine that waits for a grace period waits for it too
 * (moving a task between cgroups does, and forks then wait for that): hold it briefly.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

enum { ENTERED, RELEASE, LEFT, TURNS, HOLD_KEYS };

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HOLD_KEYS);
	__type(key, __u32);
	__type(value, __u64);
} hold_state SEC(".maps");

struct held {
	__u64 *release;
};

static int released(__u32 index, struct held *held)
{
	return *(volatile __u64 *)held->release != 0;
}

static int turn(__u32 index, struct held *held)
{
	bpf_loop(1 << 20, released, held, 0);
	return *(volatile __u64 *)held->release != 0;
}

SEC("cgroup/bind4")
int hold(struct bpf_sock_addr *ctx)
{
	__u32 keys[HOLD_KEYS] = { ENTERED, RELEASE, LEFT, TURNS };
	__u64 *entered = bpf_map_lookup_elem(&hold_state, &keys[ENTERED]);
	__u64 *release = bpf_map_lookup_elem(&hold_state, &keys[RELEASE]);
	__u64 *left = bpf_map_lookup_elem(&hold_state, &keys[LEFT]);
	__u64 *turns = bpf_map_lookup_elem(&hold_state, &keys[TURNS]);

	if (!entered || !release || !left || !turns)
		return 1;
	__sync_fetch_and_add(entered, 1);
	struct held held = { release };

	*turns = bpf_loop(1 << 13, turn, &held, 0);
	__sync_fetch_and_add(left, 1);
	return 1;
}

// SPDX-License-Identifier: GPL-2.0
/*
 * portguard kernel side: cgroup bind4/bind6 guard plus cgroup_mkdir/rmdir
 * trackers that keep owner cgroup ids current with no process running, and
 * cgroup_skb ingress/egress containment of sockets that hold a reserved port
 * without being an owner's (squatters bound before the guard was loaded).
 *
 * Built once with `clang -target bpf` (see guard/kernel/objects.py); CO-RE
 * relocations against the running kernel's BTF make the object independent of
 * kernel headers. One object serves every kernel: a refused bind is refused on one of
 * three roads, and the loader loads the programs of one (bpf_program__set_autoload):
 * the cgroup bind hooks with bpf_set_retval(-deny_errno) where the kernel has it (5.18);
 * else an fmod_ret program on security_socket_bind() that returns the errno itself
 * (kernels with BTF and BPF trampolines, 5.7+); else the cgroup bind hooks with plain
 * EPERM. All three read the same maps and apply the same rule.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "guard.h"

#define ALLOW 1
#define DENY 0
#define PASS 1  /* cgroup_skb verdicts */
#define DROP 0
#define AF_INET 2
#define AF_INET6 10
#define EPERM 1
#define IPPROTO_MPTCP_ 262  /* an MPTCP socket; the cgroup hooks see its TCP subflow's protocol */

char LICENSE[] SEC("license") = "GPL";

/* Never called, never loaded: its prototype puts the parts of the contract no map type
 * names (the enums, the event record) into the object's BTF, where
 * tests/unit/test_contract.py reads them. */
__attribute__((used)) int pg_contract(enum pg_limits limits, enum pg_mode mode,
				       enum pg_verdict verdict, enum pg_port_entry entry,
				       const struct pg_event *event)
{
	return 0;
}

/* What a bind or a packet on (protocol, port) is checked against. */
struct guarded {
	__u32 slot;
	__u32 set;  /* the port's owner set */
	struct pg_config *cfg;
};

/* Whether (protocol, port) is reserved, with all of `flags`, in the active slot; fills g
 * when it is. */
static __always_inline int reserved(__u32 protocol, __u16 port, __u32 flags, struct guarded *g)
{
	__u32 zero = 0;

	if (!port)  /* port 0: autobind, kept off reserved ports by the sysctl */
		return 0;
	if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
		return 0;
	struct pg_state *st = bpf_map_lookup_elem(&state, &zero);

	if (!st)
		return 0;
	g->slot = st->active & 1;
	/* array lookups only, inlined by the verifier: nothing is hashed, no helper is called */
	__u32 index = (g->slot * 2 + (protocol == IPPROTO_UDP)) * PG_PORT_VALUES +
		      port / PG_PORTS_PER_VALUE;
	struct pg_port_entries *entries = bpf_map_lookup_elem(&ports, &index);

	if (!entries)
		return 0;
	__u16 entry = entries->entry[port % PG_PORTS_PER_VALUE];

	if (!(entry & PG_PORT_RESERVED) || (entry & flags) != flags)
		return 0;
	g->set = entry & PG_PORT_SET;
	g->cfg = bpf_map_lookup_elem(&config, &g->slot);
	return g->cfg != NULL;
}

/* Whether the subject of a cgroup program (ctx) is in the guarded network namespace
 * (netns_cookie 0: every namespace, kernels < 5.14). */
static __always_inline int guarded_netns(void *ctx, const struct guarded *g)
{
	return !g->cfg->netns_cookie || bpf_get_netns_cookie(ctx) == g->cfg->netns_cookie;
}

/* Minimal kernel types for CO-RE: field offsets come from the kernel's BTF at load. */
struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup_root {
	int hierarchy_id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
	int level;
	struct cgroup_root *root;
} __attribute__((preserve_access_index));

/* struct cgroup's ancestors, as kernels up to 6.0 keep them (ids) and from 6.1 (pointers) */
struct cgroup___ids {
	int level;
	__u64 ancestor_ids[];
} __attribute__((preserve_access_index));

struct cgroup___ptrs {
	int level;
	struct cgroup *ancestors[];
} __attribute__((preserve_access_index));

struct css_set {
	struct cgroup *dfl_cgrp;  /* the task's cgroup2 cgroup, also in a hybrid layout */
} __attribute__((preserve_access_index));

struct task_struct {
	struct css_set *cgroups;
} __attribute__((preserve_access_index));

/* The id of the ancestor at `level` from struct cgroup's flexible array of ancestors: ids up
 * to 6.0, pointers from 6.1. Not inlined: the offset relocation of the field a kernel lacks
 * fails (libbpf leaves an instruction the verifier refuses if it ever reaches it), and the
 * compiler would merge the two reads into one before the branch; out of line, the function
 * for the other kernels is never reached, so never verified. */
static __noinline __u64 ancestor_id_from_pointers(struct cgroup *cgrp, __u32 level)
{
	struct cgroup___ptrs *c = (void *)cgrp;
	struct cgroup *ancestor = NULL;
	void *at = (void *)c + bpf_core_field_offset(struct cgroup___ptrs, ancestors) +
		   level * sizeof(ancestor);

	if (bpf_probe_read_kernel(&ancestor, sizeof(ancestor), at) || !ancestor)
		return 0;
	return BPF_CORE_READ(ancestor, kn, id);
}

static __noinline __u64 ancestor_id_from_ids(struct cgroup *cgrp, __u32 level)
{
	struct cgroup___ids *c = (void *)cgrp;
	__u64 id = 0;
	void *at = (void *)c + bpf_core_field_offset(struct cgroup___ids, ancestor_ids) +
		   level * sizeof(id);

	if (bpf_probe_read_kernel(&id, sizeof(id), at))
		return 0;
	return id;
}

/* The id of the cgroup's ancestor at `level` (the cgroup itself at its own level), 0 when
 * the cgroup is shallower: what bpf_get_current_ancestor_cgroup_id() says for a task, which
 * tracing programs may not call on every kernel. Read through CO-RE instead. */
static __always_inline __u64 ancestor_id(struct cgroup *cgrp, __u32 level)
{
	if (!cgrp || level > (__u32)BPF_CORE_READ(cgrp, level))
		return 0;
	if (bpf_core_field_exists(struct cgroup___ptrs, ancestors))
		return ancestor_id_from_pointers(cgrp, level);
	return ancestor_id_from_ids(cgrp, level);
}

/* Who is judged: the binding task through the helper (the cgroup bind hooks), the socket's
 * cgroup (the packet hooks) or the binding task's cgroup read through CO-RE (the
 * security_socket_bind program, which may not call the helper on every kernel). */
enum subject {
	SUBJECT_TASK,
	SUBJECT_SOCKET,
	SUBJECT_TASK_CGROUP,
};

/* Whether the subject belongs to an owner of the set. `how` is a constant in each program,
 * so only the helper that program may call is compiled in.
 * An owner admits its whole subtree: the subject's ancestor at the owner's level is the
 * owner. So only the depths where the set has owners are visited, each costing one
 * ancestor id and one owner_ids lookup, however many owners the set has. */
static __always_inline int is_owner(__u32 slot, __u32 set_id, enum subject how,
				    struct bpf_sock *sk, struct cgroup *cgrp)
{
	__u32 index = set_id * PG_SLOTS + slot;
	struct pg_set_val *set = bpf_map_lookup_elem(&sets, &index);

	if (!set)
		return 0;
	for (__u32 i = 0; i < PG_SET_LEVELS; i++) {
		if (i >= set->nlevels)
			break;
		__u32 level = set->level[i];
		__u64 ancestor = how == SUBJECT_SOCKET ? bpf_sk_ancestor_cgroup_id(sk, level)
				 : how == SUBJECT_TASK ? bpf_get_current_ancestor_cgroup_id(level)
				 : ancestor_id(cgrp, level);

		if (!ancestor)  /* the subject is shallower than this level and the next */
			break;
		struct pg_id_key ik = { .id = ancestor, .slot = slot };
		__u32 *idx = bpf_map_lookup_elem(&owner_ids, &ik);

		if (idx && *idx < PG_MAX_OWNER_PATHS &&
		    (set->members[*idx / 64] >> (*idx % 64)) & 1)
			return 1;
	}
	return 0;
}

/* counters: the denied or the contained map. Per-CPU values, yet atomic adds: cgroup
 * programs run with migration disabled but stay preemptible, so two tasks on one CPU may
 * interleave a plain load-add-store and lose a count. The add's result is unused, so it
 * compiles to a plain BPF atomic add. */
static __always_inline void count(void *counters, __u8 proto, __u16 port)
{
	struct pg_count_key ck = { .proto = proto, .port = port };
	__u64 one = 1, *count = bpf_map_lookup_elem(counters, &ck);

	if (count) {
		__sync_fetch_and_add(count, 1);
		return;
	}
	if (bpf_map_update_elem(counters, &ck, &one, BPF_NOEXIST)) {
		count = bpf_map_lookup_elem(counters, &ck);
		if (count)
			__sync_fetch_and_add(count, 1);
	}
}

/* One event record: addr holds the address as the bind asked for it (IPv4 in addr[0]). */
static __always_inline void report(__u64 cgroup_id, const __u32 addr[4], __u8 family,
				   __u8 proto, __u16 port, __u32 set_id, __u8 verdict)
{
	struct pg_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

	if (!ev) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&lost, &zero);

		if (n)
			__sync_fetch_and_add(n, 1);
		return;
	}
	ev->ts_ns = bpf_ktime_get_ns();
	ev->cgroup_id = cgroup_id;
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->uid = (__u32)bpf_get_current_uid_gid();
	ev->port = port;
	ev->proto = proto;
	ev->family = family;
	ev->verdict = verdict;
	ev->pad[0] = ev->pad[1] = ev->pad[2] = 0;
	ev->set = set_id;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	__builtin_memcpy(ev->addr, addr, sizeof(ev->addr));
	bpf_ringbuf_submit(ev, 0);
}

/* The rule: a reserved port in the guarded namespace is for its owners only. set_retval is
 * a constant per program, so the EPERM programs never contain the helper call that kernels
 * before 5.18 would refuse. */
static __always_inline int guard_bind(struct bpf_sock_addr *ctx, __u8 family, int set_retval)
{
	__u32 protocol = ctx->protocol;  /* 4-byte load: narrow loads are refused */
	__u16 port = bpf_ntohs(ctx->user_port);
	struct guarded g;

	if (!reserved(protocol, port, 0, &g) || !guarded_netns(ctx, &g))
		return ALLOW;
	if (is_owner(g.slot, g.set, SUBJECT_TASK, NULL, NULL))
		return ALLOW;
	count(&denied, protocol, port);
	int audit = g.cfg->mode == PG_MODE_AUDIT;
	__u32 addr[4] = {};

	if (family == AF_INET) {
		addr[0] = ctx->user_ip4;
	} else {
		addr[0] = ctx->user_ip6[0];
		addr[1] = ctx->user_ip6[1];
		addr[2] = ctx->user_ip6[2];
		addr[3] = ctx->user_ip6[3];
	}
	/* one report for both verdicts: the verifier walks its code once */
	report(bpf_get_current_cgroup_id(), addr, family, protocol, port, g.set,
	       audit ? PG_VERDICT_AUDIT : PG_VERDICT_DENIED);
	if (audit)
		return ALLOW;
	/* Only on the deny path: set_retval followed by ALLOW still fails the bind. */
	if (set_retval && g.cfg->deny_errno)
		bpf_set_retval(-(int)g.cfg->deny_errno);
	return DENY;
}

SEC("cgroup/bind4")
int portguard_bind4(struct bpf_sock_addr *ctx)
{
	return guard_bind(ctx, AF_INET, 1);
}

SEC("cgroup/bind6")
int portguard_bind6(struct bpf_sock_addr *ctx)
{
	return guard_bind(ctx, AF_INET6, 1);
}

SEC("cgroup/bind4")
int portguard_bind4_eperm(struct bpf_sock_addr *ctx)
{
	return guard_bind(ctx, AF_INET, 0);
}

SEC("cgroup/bind6")
int portguard_bind6_eperm(struct bpf_sock_addr *ctx)
{
	return guard_bind(ctx, AF_INET6, 0);
}

/* The second road, for kernels without bpf_set_retval: __sys_bind() calls
 * security_socket_bind() before the protocol's bind, and an fmod_ret program's non-zero
 * return skips the hook and fails the bind with exactly that value. The kernel allows
 * fmod_ret on every security_* function (5.7; BTF and BPF trampolines needed, not lsm=bpf).
 * It runs for every bind on the machine, so anything but a TCP or UDP socket of AF_INET or
 * AF_INET6 leaves at once, and only tasks inside the attach cgroup's subtree are judged.
 * Sockets the kernel binds itself (kernel_bind()) never pass through here. */
struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

struct sock_common {
	unsigned short skc_family;
	struct {
		struct net *net;
	} skc_net;  /* possible_net_t */
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct socket {
	struct sock *sk;
} __attribute__((preserve_access_index));

struct sockaddr;

/* what a bind's address holds up to the IPv6 address (sockaddr_in's address at addr[0]) */
struct bind_address {
	__u16 family;
	__u16 port;  /* network byte order */
	__u32 ip4_or_flowinfo;
	__u32 ip6[4];
};

/* Attached to security_socket_bind: the judge in hook_judge decides (bpf/guard.h); no judge,
 * no refusal. A tail call keeps this program's context, so the judge sees the same bind. */
SEC("fmod_ret/security_socket_bind")
int BPF_PROG(portguard_socket_bind, struct socket *sock, struct sockaddr *address, int addrlen,
	     int ret)
{
	bpf_tail_call(ctx, &hook_judge, 0);
	return ret;
}

/* Loaded, never attached: portguard_socket_bind's tail call runs it. */
SEC("fmod_ret/security_socket_bind")
int BPF_PROG(portguard_bind_judge, struct socket *sock, struct sockaddr *address, int addrlen,
	     int ret)
{
	if (ret)  /* refused already (another LSM) */
		return ret;
	struct sock *sk = BPF_CORE_READ(sock, sk);

	if (!sk)
		return 0;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	__u32 protocol = BPF_CORE_READ(sk, sk_protocol);

	if (family != AF_INET && family != AF_INET6)
		return 0;
	if (protocol == IPPROTO_MPTCP_)
		protocol = IPPROTO_TCP;
	/* the lengths inet_bind() and inet6_bind() accept; shorter ones fail there (EINVAL) */
	__u32 length = family == AF_INET ? 16 : 24;
	struct bind_address a = {};

	if (addrlen < (int)length || bpf_probe_read_kernel(&a, sizeof(a) > length ? length
								   : sizeof(a), address))
		return 0;
	__u16 port = bpf_ntohs(a.port);
	struct guarded g;

	if (!reserved(protocol, port, 0, &g))
		return 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct cgroup *cgrp = BPF_CORE_READ(task, cgroups, dfl_cgrp);

	/* judged: tasks in the attach cgroup's subtree, in the guarded network namespace */
	if (ancestor_id(cgrp, g.cfg->scope_level) != g.cfg->scope_id)
		return 0;
	if (g.cfg->netns_ino &&
	    BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum) != g.cfg->netns_ino)
		return 0;
	if (is_owner(g.slot, g.set, SUBJECT_TASK_CGROUP, NULL, cgrp))
		return 0;
	count(&denied, protocol, port);
	int audit = g.cfg->mode == PG_MODE_AUDIT;
	__u32 addr[4] = {};

	if (family == AF_INET) {
		addr[0] = a.ip4_or_flowinfo;
	} else {
		addr[0] = a.ip6[0];
		addr[1] = a.ip6[1];
		addr[2] = a.ip6[2];
		addr[3] = a.ip6[3];
	}
	report(BPF_CORE_READ(cgrp, kn, id), addr, family, protocol, port, g.set,
	       audit ? PG_VERDICT_AUDIT : PG_VERDICT_DENIED);
	if (audit)
		return 0;
	return -(int)(g.cfg->deny_errno ? g.cfg->deny_errno : EPERM);
}

/* A packet of a socket whose local port is reserved with PG_PORT_CONTAIN passes only when
 * the socket was created in an owner's cgroup (or below). The programs run for sockets
 * created inside the attach cgroup's subtree; skb->sk is then the full socket (a listener
 * for its SYN-ACKs and request sockets; accepted sockets keep the listener's cgroup). */
static __always_inline int contain(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct guarded g;

	if (!sk)
		return PASS;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return PASS;
	__u32 protocol = sk->protocol;
	__u16 port = sk->src_port;  /* host byte order: the socket's local port */

	if (!reserved(protocol, port, PG_PORT_CONTAIN, &g) || !guarded_netns(skb, &g))
		return PASS;
	if (is_owner(g.slot, g.set, SUBJECT_SOCKET, sk, NULL))
		return PASS;
	count(&contained, protocol, port);
	return g.cfg->mode == PG_MODE_AUDIT ? PASS : DROP;
}

SEC("cgroup_skb/ingress")
int portguard_ingress(struct __sk_buff *skb)
{
	return contain(skb);
}

SEC("cgroup_skb/egress")
int portguard_egress(struct __sk_buff *skb)
{
	return contain(skb);
}

/* The path the tracepoint reports, as a zero-padded map key; NULL when it cannot be
 * represented exactly (too long): a truncated key could name a different cgroup. */
static __always_inline struct pg_path_key *path_key(const char *path)
{
	__u32 zero = 0;
	struct pg_path_key *key = bpf_map_lookup_elem(&scratch, &zero);

	if (!key)
		return NULL;
	__builtin_memset(key->path, 0, sizeof(key->path));
	long len = bpf_probe_read_kernel_str(key->path, sizeof(key->path), path);

	if (len <= 0 || len >= PG_PATH_MAX)
		return NULL;
	return key;
}

/* Fires under cgroup_mutex before the new cgroup is activated: no task can be in
 * it yet, so an owner is known by its new id before it can bind anything.
 * raw_tp, not tp_btf: the arguments come untyped from the u64 context array and the
 * cgroup is read with BPF_CORE_READ (probe reads), so libbpf needs no kernel BTF to find
 * an attach point, only the few types of the CO-RE relocations: a minimal BTF
 * (guard/kernel/corebtf.py) serves instead of parsing all of the kernel's. raw_tp programs
 * exist since 4.17, bpf_probe_read_kernel since 5.5. */
SEC("raw_tp/cgroup_mkdir")
int BPF_PROG(portguard_cgroup_mkdir, struct cgroup *cgrp, const char *path)
{
	if (BPF_CORE_READ(cgrp, root, hierarchy_id) != 0)  /* cgroup v1 hierarchies: ids collide */
		return 0;
	struct pg_path_key *key = path_key(path);

	if (!key)
		return 0;
	struct pg_owner_val owner = {
		.id = BPF_CORE_READ(cgrp, kn, id),
		.level = BPF_CORE_READ(cgrp, level),
	};

	if (!owner.id)  /* a read that failed (no cgroup has id 0) */
		return 0;

	for (__u32 slot = 0; slot < PG_SLOTS; slot++) {
		key->slot = slot;
		__u32 *idx = bpf_map_lookup_elem(&paths, key);

		if (idx) {
			struct pg_owner_key ok = { .slot = slot, .idx = *idx };
			struct pg_id_key ik = { .id = owner.id, .slot = slot };

			/* owner_ids first: the bind path finds the owner only through it */
			bpf_map_update_elem(&owner_ids, &ik, idx, BPF_ANY);
			bpf_map_update_elem(&owners, &ok, &owner, BPF_ANY);
		}
	}
	return 0;
}

SEC("raw_tp/cgroup_rmdir")
int BPF_PROG(portguard_cgroup_rmdir, struct cgroup *cgrp, const char *path)
{
	if (BPF_CORE_READ(cgrp, root, hierarchy_id) != 0)
		return 0;
	struct pg_path_key *key = path_key(path);

	if (!key)
		return 0;
	__u64 id = BPF_CORE_READ(cgrp, kn, id);

	if (!id)
		return 0;

	for (__u32 slot = 0; slot < PG_SLOTS; slot++) {
		key->slot = slot;
		__u32 *idx = bpf_map_lookup_elem(&paths, key);

		if (idx) {
			struct pg_owner_key ok = { .slot = slot, .idx = *idx };
			struct pg_owner_val *owner = bpf_map_lookup_elem(&owners, &ok);

			struct pg_id_key ik = { .id = id, .slot = slot };

			bpf_map_delete_elem(&owner_ids, &ik);
			if (owner && owner->id == id)
				bpf_map_delete_elem(&owners, &ok);
		}
	}
	return 0;
}

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * portguard's kernel/user contract, written once: the constants, the map keys and
 * values, the map definitions and the event record. The Python controller mirrors
 * them in guard/kernel/layout.py, and tests/unit/test_contract.py checks that mirror
 * against the BTF of the compiled object (member offsets and sizes, every constant,
 * each map's type, key, value and size), so the two cannot drift apart. The digest
 * of this file names the pin sub-directory: a changed layout is never loaded onto
 * maps of the old one.
 *
 * Semantics. A bind of a reserved (protocol, port) in the guarded network namespace
 * is refused unless the caller's cgroup is one of the port's owners or below one;
 * everything else passes untouched. Every configuration-dependent entry carries a
 * slot (0 or 1). The programs only read the slot named by state.active; apply fills
 * the inactive slot completely, then flips state.active with one map update. That
 * flip is the single instant at which the guard changes, for IPv4 and IPv6 alike.
 *
 * Constants are enums (not #defines) so that they are part of the object's BTF.
 * Include only from BPF C, after <bpf/bpf_helpers.h>.
 */
#ifndef PORTGUARD_GUARD_H
#define PORTGUARD_GUARD_H

enum pg_limits {
	PG_SLOTS = 2,
	PG_MAX_OWNERS = 64,          /* owners of one port */
	PG_MAX_OWNER_PATHS = 4096,   /* distinct owner cgroups per slot */
	PG_MAX_SETS = 4096,          /* distinct owner sets per slot */
	PG_MAX_PORTS = 65535 * 2,    /* every port, tcp and udp */
	PG_PATH_MAX = 256,           /* cgroup path incl. NUL; longer paths are refused */
	PG_EVENT_BYTES = 256 * 1024, /* the event ring buffer */
	PG_SET_LEVELS = 4,           /* distinct depths of the owners of one port */
	PG_MEMBER_WORDS = 4096 / 64, /* the owner bitmap of a set: PG_MAX_OWNER_PATHS bits */
	PG_PORTS_PER_VALUE = 32,     /* port entries in one value of the ports array */
	PG_PORT_VALUES = 65536 / 32, /* values of the ports array per slot and protocol */
	PG_SYSCTL_WORDS = 65536 / 64, /* the sysctl_added bitmap */
};

enum pg_mode {
	PG_MODE_ENFORCE = 0,
	PG_MODE_AUDIT = 1,  /* count and report, but allow */
};

enum pg_verdict {
	PG_VERDICT_DENIED = 0,
	PG_VERDICT_AUDIT = 1,
};

/* a port's entry in the ports array: 0 when the port is not reserved */
enum pg_port_entry {
	PG_PORT_SET = 0x0fff,       /* mask: the owner set id (< PG_MAX_SETS) */
	PG_PORT_RESERVED = 0x4000,  /* the port is reserved for that set */
	PG_PORT_CONTAIN = 0x8000,   /* drop packets of sockets on the port that are not an owner's */
};

/* ports: one 16-bit entry (enum pg_port_entry) per slot, protocol and port number, in an
 * array: value (slot * 2 + (proto == IPPROTO_UDP)) * PG_PORT_VALUES + port / 32, entry
 * port % 32. An array lookup is inlined by the verifier (no helper call, no hashing), and
 * its size does not depend on the policy: 2 x 2 x 65,536 x 2 bytes = 512 KiB. */
struct pg_port_entries {
	__u16 entry[PG_PORTS_PER_VALUE];
};

/* sets: the owners allowed to bind a port, an array indexed by set * PG_SLOTS + slot (an
 * inlined lookup; sized to the policy when created, a set beyond its end is no owner's);
 * count 0: no such set. The owner test visits only the depths where the set has owners: at
 * each, the caller's ancestor cgroup id is looked up in owner_ids and its owner index
 * tested in members. The cost is one lookup per such depth, whatever the number of
 * owners. */
struct pg_set_val {
	__u32 count;
	__u16 owner[PG_MAX_OWNERS];  /* owner indices, see owners */
	__u32 nlevels;
	__u8 level[PG_SET_LEVELS];   /* the owners' depths below the cgroup2 root, ascending */
	__u64 members[PG_MEMBER_WORDS];  /* bit i: owner index i is in the set */
};

/* paths: owner cgroup path (relative to the cgroup2 root, as the cgroup
 * tracepoints report it) -> owner index. Written by apply only. */
struct pg_path_key {
	__u32 slot;
	char path[PG_PATH_MAX];
};

/* owners: owner index -> the cgroup that exists at that path right now.
 * Seeded by apply, then kept current by the cgroup_mkdir/rmdir programs. */
struct pg_owner_key {
	__u32 slot;
	__u32 idx;
};

struct pg_owner_val {
	__u64 id;     /* cgroup id (inode number of the cgroup directory) */
	__u32 level;  /* depth below the cgroup2 root */
	__u32 pad;
};

/* owner_ids: the cgroup id of an existing owner cgroup -> its owner index; the owners
 * map turned around, for the bind path. Kept with it by apply and the trackers. */
struct pg_id_key {
	__u64 id;
	__u32 slot;
	__u32 pad;
};

/* config: per slot */
struct pg_config {
	__u64 netns_cookie;  /* only binds in this network namespace are guarded; 0: all */
	__u32 deny_errno;    /* errno the binder sees; 0 = plain EPERM */
	__u32 mode;          /* enum pg_mode */
	/* The security_socket_bind program runs for every bind on the machine: it judges only
	 * tasks in the attach cgroup's subtree (the cgroup programs are scoped by attaching
	 * there), and knows the guarded network namespace by its inode number, which user
	 * space can read on every kernel (SO_NETNS_COOKIE needs 5.14). */
	__u64 scope_id;      /* the attach cgroup's id */
	__u32 scope_level;   /* its depth below the cgroup2 root */
	__u32 netns_ino;     /* the guarded network namespace's inode; 0: all */
};

/* hook_judge: a program array of one entry, pinned beside the maps directories (not in one):
 * the program attached to security_socket_bind (portguard_socket_bind) only tail-calls the
 * judge it holds (portguard_bind_judge, which reads its own set of maps) and passes the bind
 * when it holds none. A tracing link cannot swap its program, and two fmod_ret programs on
 * one function both judge every bind (chained: a bind passes only when every program lets
 * it), so the judging moves between sets of maps (a new layout, maps grown for a larger
 * policy, a new program) in one write of this entry: every bind meets exactly one judge,
 * and a run killed at any point leaves the old judge or the new one. Its definition never
 * changes, whatever the layout. */

/* state: a single entry */
struct pg_state {
	__u32 active;  /* slot the programs read */
	__u32 pad;
};

/* denied and contained: per-CPU counters, keyed without slot so they survive re-apply */
struct pg_count_key {
	__u8 proto;
	__u8 pad;
	__u16 port;
};

/* events: one record per refused (or, in audit mode, would-be refused) bind */
struct pg_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 uid;
	__u16 port;
	__u8 proto;
	__u8 family;   /* AF_INET or AF_INET6 */
	__u8 verdict;  /* enum pg_verdict */
	__u8 pad[3];
	__u32 set;
	char comm[16];
	__u8 addr[16]; /* IPv4 in the first 4 bytes */
};

/* meta: a single entry naming the loaded program object (its content digest and the
 * denial style), so a re-apply with an unchanged program touches maps only */
struct pg_meta {
	char object[64];
};

/* ---- the maps ---------------------------------------------------------------------- */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PG_SLOTS * 2 * PG_PORT_VALUES);
	__uint(map_flags, BPF_F_MMAPABLE);  /* read by the controller as memory, no syscalls */
	__type(key, __u32);
	__type(value, struct pg_port_entries);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PG_SLOTS * PG_MAX_SETS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct pg_set_val);
} sets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PG_SLOTS * PG_MAX_OWNER_PATHS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pg_path_key);
	__type(value, __u32);
} paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PG_SLOTS * PG_MAX_OWNER_PATHS);
	__type(key, struct pg_owner_key);
	__type(value, struct pg_owner_val);
} owners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PG_SLOTS * PG_MAX_OWNER_PATHS);
	__type(key, struct pg_id_key);
	__type(value, __u32);
} owner_ids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PG_SLOTS);
	__type(key, __u32);
	__type(value, struct pg_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pg_state);
} state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, PG_MAX_PORTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pg_count_key);
	__type(value, __u64);
} denied SEC(".maps");

/* packets of non-owner sockets dropped on PG_PORT_CONTAIN ports (audit: seen) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, PG_MAX_PORTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pg_count_key);
	__type(value, __u64);
} contained SEC(".maps");

/* struct pg_event records */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PG_EVENT_BYTES);
} events SEC(".maps");

/* events that did not fit in the ring buffer */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pg_meta);
} meta SEC(".maps");

/* ports portguard added to net.ipv4.ip_local_reserved_ports, so remove takes away only
 * those: a bitmap, word port / 64, bit port % 64 (8 KiB). Layouts before it kept a hash
 * (key: __u16 port, value: __u8 1), which apply still reads when it takes their maps over. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PG_SYSCTL_WORDS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} sysctl_added SEC(".maps");

/* hook_judge: see above */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} hook_judge SEC(".maps");

/* per-CPU scratch for the cgroup path key: too large for the 512-byte stack */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pg_path_key);
} scratch SEC(".maps");

#endif

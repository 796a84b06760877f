/* SPDX-License-Identifier: GPL-2.0 */
/*
 * portguard map layout: the single truth shared by the BPF programs (guard.bpf.c)
 * and the Python controller (guard/layout.py mirrors these structs field by field;
 * a unit test compares both, and the layout hash names the pin sub-directory, so a
 * changed layout is never loaded onto maps of the old one).
 *
 * Every configuration-dependent entry carries a slot (0 or 1). The programs only
 * read the slot named by state.active; `apply` fills the inactive slot completely,
 * then flips state.active with one map update. That flip is the single instant at
 * which the guard changes, for IPv4 and IPv6 alike.
 */
#ifndef PORTGUARD_GUARD_H
#define PORTGUARD_GUARD_H

#define PG_SLOTS 2
#define PG_MAX_OWNERS 64          /* owners of one port */
#define PG_MAX_OWNER_PATHS 4096   /* distinct owner cgroups per slot */
#define PG_MAX_SETS 4096          /* distinct owner sets per slot */
#define PG_MAX_PORTS (65535 * 2)  /* every port, tcp and udp */
#define PG_PATH_MAX 256           /* cgroup path incl. NUL; longer paths are refused */

#define PG_MODE_ENFORCE 0
#define PG_MODE_AUDIT 1

#define PG_VERDICT_DENIED 0
#define PG_VERDICT_AUDIT 1

/* pg_port_val.flags */
#define PG_PORT_CONTAIN 1  /* drop packets of sockets on the port that are not an owner's */

/* ports: which (slot, protocol, port) is reserved, and for which owner set */
struct pg_port_key {
	__u8 slot;
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u16 port;  /* host byte order */
};

struct pg_port_val {
	__u32 set;    /* owner set id */
	__u32 flags;  /* PG_PORT_* */
};

/* sets: the owners allowed to bind a port */
struct pg_set_key {
	__u32 slot;
	__u32 set;
};

struct pg_set_val {
	__u32 count;
	__u16 owner[PG_MAX_OWNERS];  /* owner indices, see owners */
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

/* config: per slot */
struct pg_config {
	__u64 netns_cookie;  /* only binds in this network namespace are guarded */
	__u32 deny_errno;    /* errno the binder sees; 0 = plain EPERM */
	__u32 mode;          /* PG_MODE_* */
};

/* state: a single entry */
struct pg_state {
	__u32 active;  /* slot the programs read */
	__u32 pad;
};

/* denied: per-CPU denial counters, keyed without slot so they survive re-apply */
struct pg_count_key {
	__u8 proto;
	__u8 pad;
	__u16 port;
};

/* contained: per-CPU counters of dropped packets (PG_PORT_CONTAIN), keyed like denied */

/* events: one record per refused (or, in audit mode, would-be refused) bind */
struct pg_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 uid;
	__u16 port;
	__u8 proto;
	__u8 family;   /* AF_INET or AF_INET6 */
	__u8 verdict;  /* PG_VERDICT_* */
	__u8 pad[3];
	__u32 set;
	char comm[16];
	__u8 addr[16]; /* IPv4 in the first 4 bytes */
};

/* meta: a single entry naming the loaded program object (its content digest), so a
 * re-apply with an unchanged program touches maps only */
struct pg_meta {
	char object[64];
};

/* sysctl_added: ports portguard added to net.ipv4.ip_local_reserved_ports (key: port,
 * value: 1), so remove takes away only those */

#endif

// SPDX-License-Identifier: GPL-2.0
/*
 * For comparison only: a bind guard that scans a rule list, the way systemd's
 * SocketBindAllow=/SocketBindDeny= program does (up to 128 rules per unit, each
 * checked in turn on every bind). Written for portguard's benchmark, not taken from
 * systemd. A rule that matches denies; the benchmark makes no rule match, so every
 * bind scans all `count` rules, the worst case and the common one (most binds are to
 * ports nobody reserved).
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_RULES 128
#define AF_INET 2
#define AF_INET6 10

char LICENSE[] SEC("license") = "GPL";

struct rule {
	__u32 family;      /* AF_INET or AF_INET6; 0 matches both */
	__u32 protocol;    /* IPPROTO_TCP or IPPROTO_UDP; 0 matches both */
	__u16 port_first;
	__u16 port_count;  /* 0 matches every port */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule);
} rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} rule_count SEC(".maps");

static __always_inline int rule_matches(const struct rule *rule, __u32 family, __u32 protocol,
					__u16 port)
{
	if (rule->family && rule->family != family)
		return 0;
	if (rule->protocol && rule->protocol != protocol)
		return 0;
	if (rule->port_count && (port < rule->port_first ||
				 port - rule->port_first >= rule->port_count))
		return 0;
	return 1;
}

static __always_inline int scan(struct bpf_sock_addr *ctx, __u32 family)
{
	__u32 zero = 0, *count = bpf_map_lookup_elem(&rule_count, &zero);
	__u32 protocol = ctx->protocol;
	__u16 port = bpf_ntohs(ctx->user_port);

	if (!count)
		return 1;
	for (__u32 i = 0; i < MAX_RULES; i++) {
		if (i >= *count)
			break;
		struct rule *rule = bpf_map_lookup_elem(&rules, &i);

		if (rule && rule_matches(rule, family, protocol, port))
			return 0;
	}
	return 1;
}

SEC("cgroup/bind4")
int scan_bind4(struct bpf_sock_addr *ctx)
{
	return scan(ctx, AF_INET);
}

SEC("cgroup/bind6")
int scan_bind6(struct bpf_sock_addr *ctx)
{
	return scan(ctx, AF_INET6);
}

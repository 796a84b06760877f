// SPDX-License-Identifier: GPL-2.0
/*
 * Bind-cost driver: join a cgroup, then time socket()+bind()+close() in a loop.
 * Usage: bindloop CGROUP_PROCS PORT ITERATIONS
 * Prints "<wall ns per iteration> <CPU ns per iteration> <binds that succeeded> <errno of
 * the last failure>". CPU time (user + system of this process) is what a ratio should use
 * on a busy machine: time spent preempted by other tasks is not in it.
 * The cgroup is joined before any socket exists: the cgroup a socket is created in
 * decides which bind programs run.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double cpu_ns(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e9 +
	       (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e3;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s CGROUP_PROCS PORT ITERATIONS\n", argv[0]);
		return 2;
	}
	FILE *procs = fopen(argv[1], "w");

	if (!procs || fprintf(procs, "%d\n", getpid()) < 0 || fclose(procs)) {
		perror("joining the cgroup");
		return 1;
	}
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
	long iterations = atol(argv[3]), ok = 0;
	int last_errno = 0, one = 1;

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	double start = now_ns(), start_cpu = cpu_ns();

	for (long i = 0; i < iterations; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
			ok++;
		else
			last_errno = errno;
		close(fd);
	}
	printf("%.1f %.1f %ld %d\n", (now_ns() - start) / iterations,
	       (cpu_ns() - start_cpu) / iterations, ok, last_errno);
	return 0;
}

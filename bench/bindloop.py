"""Bind-cost driver in Python, the same loop as bindloop.c: join a cgroup, then time
socket()+bind()+close() in wall and CPU time. Usage: bindloop.py CGROUP_PROCS PORT ITERATIONS"""

import os
import socket
import sys
import time

procs, port, iterations = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(procs, "w") as f:
    f.write(str(os.getpid()))
ok = last_errno = 0
start, start_cpu = time.perf_counter_ns(), time.process_time_ns()
for _ in range(iterations):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        ok += 1
    except OSError as exc:
        last_errno = exc.errno
    s.close()
wall, cpu = time.perf_counter_ns() - start, time.process_time_ns() - start_cpu
print(f"{wall / iterations:.1f} {cpu / iterations:.1f} {ok} {last_errno}")

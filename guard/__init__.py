"""portguard: race-free port reservations enforced in the kernel with eBPF."""

"""portguard's benchmarks: `sudo python3 -m bench` from the repository root (see RESULTS.md)."""

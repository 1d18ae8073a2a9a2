"""The benchmarks: harness throughput against qemu-img bench (throughput), crash-state building (crashstates) and the reference model (refdisk)."""

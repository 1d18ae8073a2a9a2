"""The stateful things qcrash compares: the reference disk model and the qcow2 implementation."""

#!/bin/sh
# qcrash qemu-target reproducer (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)): repair-not-idempotent - a crash during repair leaves an image the next repair fixes, with the same guest data
# configuration: v3 cluster_size=16384 refcount_bits=1 lazy_refcounts=on cache=writethrough size=2097152
# crash state: [p=13 drop-unsynced keep=none, then recovery crashed at p=4 subsets keep=3]   recovery path: open
# evidence: read-write open failed: qemu-io: can't open: Could not repair dirty image: Input/output error (137 lines before it, first: ERROR refcount table entry 0 has reserved bits set) (recovery crashed at [p=4 subsets keep=3])
set -u
cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. How the image was built (for reading; qcrash logged every host write of these through
#    blklogwrites and applied the crash state above to make the shipped crash image):
#    /usr/bin/qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=16384,refcount_bits=1,lazy_refcounts=on image.qcow2 2097152
#    open -t writethrough -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 0 512
#    write -q -P 0x5a 918528 16384

# 2. The crash image, as the crash left it:
cp q5b-rebuild-crash-stale-table.qcow2 "$W/work.qcow2"

# 3. The command whose result breaks the contract. Expected: after recovery check exits 0 and the dirty bit is clear.
# Observed: read-write open failed: qemu-io: can't open: Could not repair dirty image: Input/output error (137 lines before it, first: ERROR refcount table entry 0 has reserved bits set) (recovery crashed at [p=4 subsets keep=3])
"$QEMU_IO" -f qcow2 -c close $W/work.qcow2   # a read-write open repairs a dirty image
"$QEMU_IMG" check $W/work.qcow2 >/dev/null || "$QEMU_IMG" check -r leaks $W/work.qcow2
"$QEMU_IMG" check $W/work.qcow2; echo "exit $?"

#!/bin/sh
# qcrash qemu-target reproducer (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)): check-failed - a live image checks clean
# configuration: v3 cluster_size=32768 refcount_bits=2 lazy_refcounts=on cache=writethrough size=1048576
# crash state: [None]   recovery path: open
# evidence: after a clean close: check: 0 corruptions, 1 leaks, 0 check errors; Leaked cluster 4 refcount=1 reference=0, incompatible_features=0x0
set -u
cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. How the image was built (for reading; qcrash logged every host write of these through
#    blklogwrites and applied the crash state above to make the shipped crash image):
#    /usr/bin/qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=32768,refcount_bits=2,lazy_refcounts=on image.qcow2 1048576
#    open -t writethrough -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 0 512
#    # crash: qemu-io killed; continuing on the recovered image
#    open -t writethrough -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 0 512
#    close

# 2. The crash image, as the crash left it:
cp q1-leak-past-eof.qcow2 "$W/work.qcow2"

# 3. The command whose result breaks the contract. Expected: the image checks clean (exit 0).
# Observed: after a clean close: check: 0 corruptions, 1 leaks, 0 check errors; Leaked cluster 4 refcount=1 reference=0, incompatible_features=0x0
"$QEMU_IMG" check $W/work.qcow2; echo "exit $?"

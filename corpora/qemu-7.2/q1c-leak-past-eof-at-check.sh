#!/bin/sh
# qcrash qemu-target reproducer (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)): check-failed - a live image checks clean
# configuration: v3 cluster_size=16384 refcount_bits=2 lazy_refcounts=off cache=writeback size=1048576
# crash state: [None]   recovery path: open
# evidence: check: 0 corruptions, 1 leaks, 0 check errors; Leaked cluster 4 refcount=1 reference=0
set -u
cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. How the image was built (for reading; qcrash logged every host write of these through
#    blklogwrites and applied the crash state above to make the shipped crash image):
#    /usr/bin/qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=16384,refcount_bits=2,lazy_refcounts=off image.qcow2 1048576
#    open -t writeback -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -z 750080 16384
#    flush
#    write -q -P 0x5a 114688 9728
#    write -q -P 0x5a 131072 32768
#    # crash: qemu-io killed; continuing on the recovered image
#    open -t writeback -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 180224 4096
#    write -q -z 81920 16384
#    close
#    # qemu-img check image.qcow2
#    open -t writeback -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.2,file.log-sector-size=512
#    close

# 2. The crash image, as the crash left it:
cp q1c-leak-past-eof-at-check.qcow2 "$W/work.qcow2"

# 3. The command whose result breaks the contract. Expected: the image checks clean (exit 0).
# Observed: check: 0 corruptions, 1 leaks, 0 check errors; Leaked cluster 4 refcount=1 reference=0
"$QEMU_IMG" check $W/work.qcow2; echo "exit $?"

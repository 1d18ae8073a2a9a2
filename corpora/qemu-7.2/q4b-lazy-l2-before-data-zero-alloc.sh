#!/bin/sh
# qcrash qemu-target reproducer (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)): data-lost - every guest sector reads its durable value or a value written to it since
# configuration: v3 cluster_size=32768 refcount_bits=8 lazy_refcounts=on cache=writethrough size=1048576
# crash state: [p=15 subsets keep=14]   recovery path: open
# evidence: stale-or-lost: sector 1152 holds the data of write #0 to sector 1152 [crc32c 0x37d71ffb], a value it held before its durable point (write #0): data lost; allowed: durable (write_zeroes #1 (zeros)) [crc32c 0x30fcedc0], write #2, in flight [crc32c 0x5c1f2c31]
set -u
cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. How the image was built (for reading; qcrash logged every host write of these through
#    blklogwrites and applied the crash state above to make the shipped crash image):
#    /usr/bin/qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=32768,refcount_bits=8,lazy_refcounts=on image.qcow2 1048576
#    open -t writethrough -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 589824 512
#    write -q -z 589824 32768
#    write -q -P 0x5a 589824 32768

# 2. The crash image, as the crash left it:
cp q4b-lazy-l2-before-data-zero-alloc.qcow2 "$W/work.qcow2"

# 3. The command whose result breaks the contract. Expected: the sector holds its durable value or a value written to it since (see the evidence).
# Observed: stale-or-lost: sector 1152 holds the data of write #0 to sector 1152 [crc32c 0x37d71ffb], a value it held before its durable point (write #0): data lost; allowed: durable (write_zeroes #1 (zeros)) [crc32c 0x30fcedc0], write #2, in flight [crc32c 0x5c1f2c31]
"$QEMU_IO" -r -f qcow2 -c "read -v 589824 512" $W/work.qcow2

#!/bin/sh
# qcrash qemu-target reproducer (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)): data-lost - every guest sector reads its durable value or a value written to it since
# configuration: v3 cluster_size=512 refcount_bits=1 lazy_refcounts=on cache=writethrough size=4194304
# crash state: [p=15 torn keep=13-14 tear=13:2]   recovery path: open
# evidence: stale-or-lost: sector 7361 holds the data of write #0 to sector 7361 [crc32c 0x179cfa1d], a value it held before its durable point (write #0): data lost; allowed: durable (write_zeroes #1 (zeros)) [crc32c 0x30fcedc0], write #2, in flight [crc32c 0x5f31a5d1]
set -u
cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. How the image was built (for reading; qcrash logged every host write of these through
#    blklogwrites and applied the crash state above to make the shipped crash image):
#    /usr/bin/qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=512,refcount_bits=1,lazy_refcounts=on image.qcow2 4194304
#    open -t writethrough -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 3768832 512
#    write -q -z 3768832 512
#    write -q -P 0x5a 3768832 1536

# 2. The crash image, as the crash left it:
cp q4c-lazy-l2-before-data-zero-alloc-torn.qcow2 "$W/work.qcow2"

# 3. The command whose result breaks the contract. Expected: the sector holds its durable value or a value written to it since (see the evidence).
# Observed: stale-or-lost: sector 7361 holds the data of write #0 to sector 7361 [crc32c 0x179cfa1d], a value it held before its durable point (write #0): data lost; allowed: durable (write_zeroes #1 (zeros)) [crc32c 0x30fcedc0], write #2, in flight [crc32c 0x5f31a5d1]
"$QEMU_IO" -r -f qcow2 -c "read -v 3768832 512" $W/work.qcow2

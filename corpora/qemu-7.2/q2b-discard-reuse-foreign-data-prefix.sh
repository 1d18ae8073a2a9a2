#!/bin/sh
# qcrash qemu-target reproducer (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)): foreign-data - never data written to another sector or by another operation
# configuration: v2 cluster_size=16384 refcount_bits=16 lazy_refcounts=off cache=directsync size=1048576
# crash state: [p=13 prefix keep=11-12]   recovery path: open
# evidence: foreign: sector 1728 holds the data of write #2 to sector 0 [crc32c 0x0f95f457], which was never allowed in sector 1728; allowed: durable (write #0) [crc32c 0x0a128146], discard #1 (zeros) [crc32c 0x30fcedc0]
set -u
cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. How the image was built (for reading; qcrash logged every host write of these through
#    blklogwrites and applied the crash state above to make the shipped crash image):
#    /usr/bin/qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=16384,refcount_bits=16 image.qcow2 1048576
#    open -t directsync -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 884736 512
#    discard -q 884736 16384
#    write -q -P 0x5a 0 512

# 2. The crash image, as the crash left it:
cp q2b-discard-reuse-foreign-data-prefix.qcow2 "$W/work.qcow2"

# 3. The command whose result breaks the contract. Expected: the sector holds its durable value or a value written to it since (see the evidence).
# Observed: foreign: sector 1728 holds the data of write #2 to sector 0 [crc32c 0x0f95f457], which was never allowed in sector 1728; allowed: durable (write #0) [crc32c 0x0a128146], discard #1 (zeros) [crc32c 0x30fcedc0]
"$QEMU_IO" -r -f qcow2 -c "read -v 884736 512" $W/work.qcow2

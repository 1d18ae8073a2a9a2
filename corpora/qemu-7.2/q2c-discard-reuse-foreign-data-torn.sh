#!/bin/sh
# qcrash qemu-target reproducer (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)): foreign-data - never data written to another sector or by another operation
# configuration: v3 cluster_size=131072 refcount_bits=1 lazy_refcounts=off cache=directsync size=2097152
# crash state: [p=13 torn keep=11-12 tear=11:0-125]   recovery path: open
# evidence: foreign: sector 2816 holds the data of write #2 to sector 0 [crc32c 0x0f95f457], which was never allowed in sector 2816; allowed: durable (write #0) [crc32c 0x1006881a], discard #1 (zeros) [crc32c 0x30fcedc0] (+255 more sectors)
set -u
cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. How the image was built (for reading; qcrash logged every host write of these through
#    blklogwrites and applied the crash state above to make the shipped crash image):
#    /usr/bin/qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=131072,refcount_bits=1,lazy_refcounts=off image.qcow2 2097152
#    open -t directsync -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 1441792 512
#    discard -q 1441792 131072
#    write -q -P 0x5a 0 131072

# 2. The crash image, as the crash left it:
cp q2c-discard-reuse-foreign-data-torn.qcow2 "$W/work.qcow2"

# 3. The command whose result breaks the contract. Expected: the sector holds its durable value or a value written to it since (see the evidence).
# Observed: foreign: sector 2816 holds the data of write #2 to sector 0 [crc32c 0x0f95f457], which was never allowed in sector 2816; allowed: durable (write #0) [crc32c 0x1006881a], discard #1 (zeros) [crc32c 0x30fcedc0] (+255 more sectors)
"$QEMU_IO" -r -f qcow2 -c "read -v 1441792 512" $W/work.qcow2

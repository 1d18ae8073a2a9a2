#!/bin/sh
# qcrash qemu-target reproducer (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)): not-clean-after-repair - after repair: 0 corruptions, 0 leaks, 0 check errors, dirty bit clear
# configuration: v3 cluster_size=512 refcount_bits=8 lazy_refcounts=on cache=writeback size=2097152
# crash state: [p=18 subsets keep=17]   recovery path: open
# evidence: check: 1 corruptions, 0 leaks, 0 check errors; ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0xe00 size 0x200, incompatible_features=0x0, refcounts past EOF: []
set -u
cd "$(dirname "$0")"
QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

# 1. How the image was built (for reading; qcrash logged every host write of these through
#    blklogwrites and applied the crash state above to make the shipped crash image):
#    /usr/bin/qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=512,refcount_bits=8,lazy_refcounts=on image.qcow2 2097152
#    open -t writeback -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.1,file.log-sector-size=512
#    write -q -P 0x5a 1670144 512
#    write -q -P 0x5a 0 512
#    close
#    # /usr/bin/qemu-img check -r leaks --output=json --image-opts driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.2,file.log-sector-size=512
#    open -t writeback -d unmap -o driver=qcow2,cache-clean-interval=0,file.driver=blklogwrites,file.file.driver=file,file.file.filename=image.qcow2,file.log.driver=file,file.log.filename=log.3,file.log-sector-size=512

# 2. The crash image, as the crash left it:
cp q3f-reference-past-eof-repair-subsets.qcow2 "$W/work.qcow2"

# 3. The command whose result breaks the contract. Expected: after recovery check exits 0 and the dirty bit is clear.
# Observed: check: 1 corruptions, 0 leaks, 0 check errors; ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0xe00 size 0x200, incompatible_features=0x0, refcounts past EOF: []
"$QEMU_IO" -f qcow2 -c close $W/work.qcow2   # a read-write open repairs a dirty image
"$QEMU_IMG" check $W/work.qcow2 >/dev/null || "$QEMU_IMG" check -r leaks $W/work.qcow2
"$QEMU_IMG" check $W/work.qcow2; echo "exit $?"

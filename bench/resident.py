#!/usr/bin/env python3
"""Which pages of a binary a live process has resident, by ELF section.

    sudo python3 bench/resident.py PID /path/to/binary

Reads /proc/PID/maps for the binary's mappings and /proc/PID/pagemap (root:
bit 63 of each page's entry is "present"), then counts the resident pages
per section of the file (readelf -S). Idle RSS that is file-backed is the
binary's code and read-only data: this shows which part of it.
"""
import collections
import re
import struct
import subprocess
import sys

PAGE = 4096


def main(pid: int, binpath: str) -> None:
    resident = []  # file offsets of resident pages
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for line in open(f"/proc/{pid}/maps"):
            f = line.split()
            if len(f) < 6 or f[5] != binpath:
                continue
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            off, pages = int(f[2], 16), (hi - lo) // PAGE
            pm.seek(lo // PAGE * 8)
            entries = struct.unpack(f"<{pages}Q", pm.read(pages * 8))
            here = [off + i * PAGE for i, e in enumerate(entries) if e >> 63 & 1]
            resident += here
            print(f"{f[1]} offset {off:#x}: {len(here)} of {pages} pages resident "
                  f"({len(here) * PAGE / 2**20:.1f} MiB)")
    sections = []
    out = subprocess.run(["readelf", "-SW", binpath], capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if m:
            sections.append((m.group(1), int(m.group(2), 16), int(m.group(3), 16)))
    by = collections.Counter()
    for o in resident:
        name = next((n for n, start, size in sections if start <= o < start + size), "?")
        by[name] += 1
    for name, n in by.most_common():
        print(f"  {name}: {n * PAGE // 1024} KiB")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: resident.py PID BINARY")
    main(int(sys.argv[1]), sys.argv[2])

"""Reads a differencing VHDX with dissect.hypervisor, which finds the parent by itself through
the child's parent locator (relative_path), and writes the virtual disk's bytes to OUT.

Usage: dissect_read.py CHILD OUT [OFFSET:LENGTH ...]

With ranges, OUT holds those byte ranges of the disk one after another, else the whole disk.

Prints one JSON line: the child's parent_linkage and the DataWriteGuid of the parent dissect
opened, both as dissect parsed them.
Exit status: 0 read; 3 dissect refused the child or could not open its parent (the reason on
stderr); 2 the module is missing.
"""

import json
import sys
import uuid
from pathlib import Path

try:
    from dissect.hypervisor.disk.vhdx import VHDX
except ImportError as e:
    sys.stderr.write(
        f"dissect.hypervisor is missing ({e}): run scripts/vhdx-readers (scripts/test does), "
        "or set BOOTTORRENT_DISSECT_PYTHON to a python that has it\n"
    )
    sys.exit(2)

CHUNK = 1 << 20


def ranges(args, size):
    if not args:
        return [(0, size)]
    return [tuple(int(n) for n in arg.split(":")) for arg in args]


def main(child_path, out_path, *range_args):
    try:
        child = VHDX(Path(child_path))
        if child.parent is None:
            raise ValueError("dissect opened no parent for the child")
        parent_guid = uuid.UUID(bytes_le=bytes(child.parent.header.data_write_guid))
        print(
            json.dumps(
                {
                    "parent_linkage": child.parent_locator.entries.get("parent_linkage"),
                    "parent_data_write_guid": str(parent_guid),
                    "size": child.size,
                }
            )
        )
        with open(out_path, "wb") as out:
            for start, length in ranges(range_args, child.size):
                offset, end = start, start + length
                while offset < end:
                    child.seek(offset)
                    data = child.read(min(CHUNK, end - offset))
                    if not data:
                        raise IOError(f"read returned nothing at offset {offset}")
                    out.write(data)
                    offset += len(data)
    except Exception as e:  # dissect raises many kinds; any of them is a refusal
        sys.stderr.write(f"dissect refused: {type(e).__name__}: {e}\n")
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])

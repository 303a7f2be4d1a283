"""Reads a differencing VHDX through its parent with libvhdi (Debian python3-libvhdi) and writes
the virtual disk's bytes to OUT.

Usage: libvhdi_read.py CHILD PARENT OUT [OFFSET:LENGTH ...]

With ranges, OUT holds those byte ranges of the disk one after another, else the whole disk.

Exit status: 0 read; 3 libvhdi refused the child or its parent (the reason on stderr);
2 the module is missing. libvhdi does not look for the parent itself: the caller names it, and
libvhdi's set_parent checks it against the child's parent_linkage.
"""

import sys

try:
    import pyvhdi
except ImportError as e:
    sys.stderr.write(f"pyvhdi is missing ({e}): install Debian's python3-libvhdi (scripts/test does)\n")
    sys.exit(2)

CHUNK = 1 << 20


def ranges(args, size):
    if not args:
        return [(0, size)]
    return [tuple(int(n) for n in arg.split(":")) for arg in args]


def main(child_path, parent_path, out_path, *range_args):
    parent = pyvhdi.file()
    child = pyvhdi.file()
    try:
        parent.open(parent_path)
        child.open(child_path)
        sys.stderr.write(
            f"libvhdi {pyvhdi.get_version()}: child disk type {child.disk_type}, "
            f"parent identifier {child.parent_identifier}, parent filename {child.parent_filename!r}\n"
        )
        child.set_parent(parent)
        with open(out_path, "wb") as out:
            for start, length in ranges(range_args, child.media_size):
                offset, end = start, start + length
                while offset < end:
                    data = child.read_buffer_at_offset(min(CHUNK, end - offset), offset)
                    if not data:
                        raise IOError(f"read returned nothing at offset {offset}")
                    out.write(data)
                    offset += len(data)
    except (IOError, OSError, ValueError) as e:
        sys.stderr.write(f"libvhdi refused: {e}\n")
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""A writer for flattened device tree blobs (DTB), as the Devicetree Specification v0.4 chapter 5 defines them.

Why our own writer and not pylibfdt: PyPI has pylibfdt only as a source distribution (checked with
``pip download pylibfdt``: ``pylibfdt-1.7.2.post2.tar.gz``, no wheel), so installing it needs swig and a C
compiler on every machine that runs pyvmm, for what is ~150 lines of pure Python here.  We only ever
*write* a tree, once, front to back, which is exactly the "sequential write" shape of the format: the
structure block is a token stream in document order (spec 5.4.2), so nothing has to be patched later
except the header.

Usage::

    w = FdtWriter()
    w.begin_node("")                    # the root
    w.property_u32("#address-cells", 2)
    w.begin_node("memory@40000000")
    w.property_string("device_type", "memory")
    w.end_node()
    w.end_node()
    blob = w.finish()

Misuse (unbalanced nodes, a property after a child node, duplicate names, names the spec does not
allow, values that do not fit a cell) raises ``ValueError`` at the call that makes it.
"""

from __future__ import annotations

import re
import struct

# Spec 5.2: the header is ten big-endian u32s; the magic is 0xd00dfeed.
FDT_MAGIC = 0xD00DFEED
_HEADER = struct.Struct(">10I")
# Spec 5.1/5.2: we write version 17, backwards compatible with 16 ("this field shall always contain 16").
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
# Spec 5.4.1 token values (big-endian u32 each).
FDT_BEGIN_NODE = 0x1
FDT_END_NODE = 0x2
FDT_PROP = 0x3
FDT_NOP = 0x4
FDT_END = 0x9
# Spec 5.3.2: the reservation list is (u64 address, u64 size) pairs ending with a (0, 0) entry.
_RESERVE_ENTRY = struct.Struct(">QQ")

_U32 = struct.Struct(">I")
_PROP_HEADER = struct.Struct(">III")  # spec 5.4.1 FDT_PROP: token, len, nameoff

# Spec 2.2.1 (Table 2.1): node-name is 1-31 characters of [0-9a-zA-Z,._+-] and "shall start with a
# lower or uppercase character"; the optional unit-address after '@' uses the same characters.
_NODE_NAME = re.compile(r"[A-Za-z][0-9A-Za-z,._+-]{0,30}(@[0-9A-Za-z,._+-]+)?")
# Spec 2.2.4 (Table 2.2): property names are 1-31 characters of [0-9a-zA-Z,._+?#-].
_PROP_NAME = re.compile(r"[0-9A-Za-z,._+?#-]{1,31}")


def _align4(n: int) -> int:
    return (n + 3) & ~3


class _Node:
    __slots__ = ("children", "has_child", "name", "props")

    def __init__(self, name: str) -> None:
        self.name = name
        self.props: set[str] = set()
        self.children: set[str] = set()
        self.has_child = False


class FdtWriter:
    """Builds one device tree front to back; :meth:`finish` returns the blob."""

    def __init__(self) -> None:
        self._struct = bytearray()
        self._strings = bytearray()
        self._string_offsets: dict[str, int] = {}
        self._stack: list[_Node] = []
        self._root_done = False
        self._next_phandle = 1
        self._finished = False

    # -- nodes ---------------------------------------------------------------------------------------
    def begin_node(self, name: str) -> None:
        """Open a node; the first one is the root and must be called ``""`` (spec 5.4.2: one root)."""
        self._check_open()
        if not self._stack:
            if self._root_done:
                raise ValueError("the tree has exactly one root node, and it is already closed")
            if name != "":
                raise ValueError(f"the root node's name is empty, not {name!r}")
        else:
            if not _NODE_NAME.fullmatch(name):
                raise ValueError(f"bad node name {name!r} (Devicetree spec 2.2.1)")
            parent = self._stack[-1]
            if name in parent.children:
                raise ValueError(f"duplicate node {name!r} under {self._path()}")
            parent.children.add(name)
            parent.has_child = True
        # Spec 5.4.1: FDT_BEGIN_NODE, the unit name NUL-terminated, zero padding to 4 bytes.
        encoded = name.encode("ascii") + b"\0"
        self._struct += _U32.pack(FDT_BEGIN_NODE) + encoded + b"\0" * (_align4(len(encoded)) - len(encoded))
        self._stack.append(_Node(name))

    def end_node(self) -> None:
        self._check_open()
        if not self._stack:
            raise ValueError("end_node() without an open node")
        self._stack.pop()
        self._struct += _U32.pack(FDT_END_NODE)
        if not self._stack:
            self._root_done = True

    # -- properties ----------------------------------------------------------------------------------
    def property(self, name: str, value: bytes) -> None:
        """A property with a raw value (spec 2.2.4: "an array of zero or more bytes")."""
        self._check_open()
        if not self._stack:
            raise ValueError(f"property {name!r} outside any node")
        node = self._stack[-1]
        if not _PROP_NAME.fullmatch(name):
            raise ValueError(f"bad property name {name!r} (Devicetree spec 2.2.4)")
        if node.has_child:
            # Spec 5.4.2: "all property definitions for a particular node precede any subnode definitions".
            raise ValueError(f"property {name!r} of {self._path()} comes after a child node")
        if name in node.props:
            raise ValueError(f"duplicate property {name!r} in {self._path()}")
        node.props.add(name)
        value = bytes(value)
        # Spec 5.4.1 FDT_PROP: token, u32 len, u32 nameoff, the value, zero padding to 4 bytes.
        self._struct += _PROP_HEADER.pack(FDT_PROP, len(value), self._string_offset(name))
        self._struct += value + b"\0" * (_align4(len(value)) - len(value))

    def property_empty(self, name: str) -> None:
        """A boolean property: present with an empty value (spec 2.2.4, Table 2.3 <empty>)."""
        self.property(name, b"")

    def property_u32(self, name: str, *values: int) -> None:
        """One or more 32-bit cells, big-endian (spec 2.2.4, Table 2.3 <u32>, <prop-encoded-array>)."""
        self.property(name, _pack_cells(name, values, 32))

    def property_u64(self, name: str, *values: int) -> None:
        """One or more 64-bit values, each as two big-endian cells (spec 2.2.4, Table 2.3 <u64>: high cell first)."""
        self.property(name, _pack_cells(name, values, 64))

    def property_string(self, name: str, value: str) -> None:
        """A NUL-terminated string (spec 2.2.4, Table 2.3 <string>)."""
        self.property_strings(name, value)

    def property_strings(self, name: str, *values: str) -> None:
        """Concatenated NUL-terminated strings (spec 2.2.4, Table 2.3 <stringlist>)."""
        if not values:
            raise ValueError(f"property {name!r}: a string list needs at least one string")
        out = bytearray()
        for v in values:
            if "\0" in v:
                raise ValueError(f"property {name!r}: strings cannot contain NUL")
            out += v.encode("utf-8") + b"\0"
        self.property(name, bytes(out))

    # -- phandles ------------------------------------------------------------------------------------
    def alloc_phandle(self) -> int:
        """A fresh phandle value; write it with ``property_u32("phandle", value)`` in the node it names.

        Spec 2.3.3: a phandle is a u32 unique within the tree.  libfdt and dtc reserve 0 ("no phandle")
        and 0xffffffff ("-1"), so we count from 1.
        """
        value = self._next_phandle
        self._next_phandle += 1
        return value

    # -- the blob ------------------------------------------------------------------------------------
    def finish(self, boot_cpuid: int = 0) -> bytes:
        """The blob: header, empty reservation block, structure block, strings block (spec 5, in order)."""
        self._check_open()
        if self._stack:
            raise ValueError(f"node {self._path()} is still open")
        if not self._root_done:
            raise ValueError("the tree has no root node")
        if not 0 <= boot_cpuid <= 0xFFFFFFFF:
            raise ValueError(f"boot_cpuid {boot_cpuid} does not fit a u32")
        self._finished = True
        structure = bytes(self._struct) + _U32.pack(FDT_END)  # spec 5.4.1: exactly one FDT_END, last
        # Spec 5.6: the reservation block is 8-byte aligned and the structure block 4-byte aligned; the
        # 40-byte header, then the 16-byte (0, 0) terminator, keep both so without padding.
        off_rsvmap = _HEADER.size
        rsvmap = _RESERVE_ENTRY.pack(0, 0)
        off_struct = off_rsvmap + len(rsvmap)
        off_strings = off_struct + len(structure)
        strings = bytes(self._strings)
        total = off_strings + len(strings)
        header = _HEADER.pack(
            FDT_MAGIC,
            total,
            off_struct,
            off_strings,
            off_rsvmap,
            FDT_VERSION,
            FDT_LAST_COMP_VERSION,
            boot_cpuid,
            len(strings),
            len(structure),
        )
        return header + rsvmap + structure + strings

    # -- helpers -------------------------------------------------------------------------------------
    def _string_offset(self, name: str) -> int:
        # Spec 5.5: property names live once each in the strings block, referred to by offset.
        off = self._string_offsets.get(name)
        if off is None:
            off = len(self._strings)
            self._strings += name.encode("ascii") + b"\0"
            self._string_offsets[name] = off
        return off

    def _path(self) -> str:
        return "/" + "/".join(n.name for n in self._stack[1:])

    def _check_open(self) -> None:
        if self._finished:
            raise ValueError("finish() was already called on this FdtWriter")


def _pack_cells(name: str, values: tuple[int, ...], bits: int) -> bytes:
    limit = 1 << bits
    for v in values:
        if not 0 <= v < limit:
            raise ValueError(f"property {name!r}: {v:#x} does not fit in {bits} bits")
    fmt = ">" + ("I" if bits == 32 else "Q") * len(values)
    return struct.pack(fmt, *values)

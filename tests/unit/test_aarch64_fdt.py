"""The FDT writer (Devicetree Specification v0.4 chapter 5) and the aarch64 machine's device tree.

The writer is checked three ways: header and layout fields read back with struct, the structure block
walked by a small independent parser here, and the blob decompiled by dtc (device-tree-compiler), whose
checks (phandle references, unit addresses vs reg, interrupt providers, ...) must pass without a
warning.  The machine tree is decompiled with dtc for each GIC version / CPU count / device count, and
round-tripped dts -> dtb -> dts.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyvmm.arch.aarch64 import layout
from pyvmm.arch.aarch64.devicetree import build_device_tree, mpidr_affinity, uart_path
from pyvmm.arch.aarch64.fdt import FDT_MAGIC, FdtWriter

HEADER = struct.Struct(">10I")
DTC = shutil.which("dtc")
needs_dtc = pytest.mark.skipif(
    DTC is None, reason="dtc not installed (Debian: apt install device-tree-compiler)"
)
MiB = 1 << 20


# -- an independent reader for what the writer produced ---------------------------------------------
Node = dict[str, Any]  # {"props": {name: bytes}, "children": {name: Node}}


def parse_blob(blob: bytes) -> tuple[Node, tuple[int, ...]]:
    """The tree in ``blob`` and its header fields; asserts the chapter 5 layout rules on the way."""
    hdr = HEADER.unpack_from(blob, 0)
    magic, total, off_struct, off_strings, off_rsv, _ver, _last, _cpu, size_strings, size_struct = hdr
    assert magic == FDT_MAGIC and total == len(blob)
    assert off_rsv % 8 == 0 and off_struct % 4 == 0  # spec 5.6
    strings = blob[off_strings : off_strings + size_strings]
    pos = off_struct
    end = off_struct + size_struct

    def word() -> int:
        nonlocal pos
        assert pos % 4 == 0, "every token 4-byte aligned (spec 5.4.1)"
        (v,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        return int(v)

    def node() -> tuple[str, Node]:
        nonlocal pos
        nul = blob.index(b"\0", pos)
        name = blob[pos:nul].decode()
        pos = (nul + 1 + 3) & ~3
        out: Node = {"props": {}, "children": {}}
        while True:
            tok = word()
            if tok == 3:  # FDT_PROP
                length, nameoff = word(), word()
                pname = strings[nameoff : strings.index(b"\0", nameoff)].decode()
                out["props"][pname] = blob[pos : pos + length]
                pos = (pos + length + 3) & ~3
                assert not out["children"], "properties before child nodes (spec 5.4.2)"
            elif tok == 1:  # FDT_BEGIN_NODE
                cname, child = node()
                out["children"][cname] = child
            elif tok == 2:  # FDT_END_NODE
                return name, out
            else:
                raise AssertionError(f"unexpected token {tok:#x} at {pos - 4:#x}")

    assert word() == 1
    root_name, root = node()
    assert root_name == ""
    assert word() == 9 and pos == end  # FDT_END, last
    return root, hdr


def u32s(value: bytes) -> list[int]:
    return list(struct.unpack(f">{len(value) // 4}I", value))


def dtc(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    assert DTC is not None
    return subprocess.run([DTC, *args], input=stdin, capture_output=True, check=False, timeout=30)


def decompile(blob: bytes) -> str:
    r = dtc("-I", "dtb", "-O", "dts", "-o", "-", "-", stdin=blob)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode() == "", f"dtc warnings: {r.stderr.decode()}"
    return r.stdout.decode()


def parse_dts(text: str) -> Node:
    """dtc's decompiled output (one property or node bracket per line) as a tree of raw value strings."""
    root: Node = {"props": {}, "children": {}}
    stack = [root]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line == "/dts-v1/;" or line == "/ {":
            continue
        if line.endswith("{"):
            child: Node = {"props": {}, "children": {}}
            stack[-1]["children"][line[:-1].strip()] = child
            stack.append(child)
        elif line == "};":
            stack.pop()
        else:
            assert line.endswith(";"), line
            name, _, value = line[:-1].partition(" = ")
            stack[-1]["props"][name] = value
    return root


def cells(value: str) -> list[int]:
    return [int(x, 16) for x in re.findall(r"0x[0-9a-f]+", value)]


# -- the writer -------------------------------------------------------------------------------------
def small_tree() -> bytes:
    w = FdtWriter()
    w.begin_node("")
    w.property_u32("#address-cells", 2)
    w.property_u32("#size-cells", 1)
    w.property_string("compatible", "test,board")
    w.begin_node("dev@1000")
    w.property_strings("compatible", "test,dev-v2", "test,dev")
    w.property_u32("reg", 0, 0x1000, 0x10)  # #address-cells 2 + #size-cells 1
    w.property_u64("dma-base", 0x1000)
    w.property_empty("dma-coherent")
    w.property("blob", b"\x01\x02\x03")
    w.end_node()
    w.end_node()
    return w.finish(boot_cpuid=3)


def test_header_fields_and_blocks() -> None:
    blob = small_tree()
    root, hdr = parse_blob(blob)
    magic, total, off_struct, off_strings, off_rsv, version, last_comp, boot_cpu, size_strs, size_st = hdr
    assert (magic, version, last_comp, boot_cpu) == (0xD00DFEED, 17, 16, 3)
    assert off_rsv == 40 and blob[off_rsv : off_rsv + 16] == bytes(16)  # empty list: the (0, 0) terminator
    assert off_struct == off_rsv + 16
    assert off_strings == off_struct + size_st and total == off_strings + size_strs
    assert blob[off_struct + size_st - 4 : off_struct + size_st] == b"\0\0\0\x09"  # FDT_END
    dev = root["children"]["dev@1000"]
    assert dev["props"]["compatible"] == b"test,dev-v2\0test,dev\0"
    assert u32s(dev["props"]["reg"]) == [0, 0x1000, 0x10]
    assert dev["props"]["dma-base"] == b"\0\0\0\0\0\0\x10\0"  # u64: two cells, high first
    assert dev["props"]["dma-coherent"] == b""
    assert dev["props"]["blob"] == b"\x01\x02\x03"  # padded to 4 in the block, length says 3
    assert root["props"]["compatible"] == b"test,board\0"


def test_strings_block_deduplicates_names() -> None:
    blob = small_tree()
    _, hdr = parse_blob(blob)
    strings = blob[hdr[3] : hdr[3] + hdr[8]]
    names = strings.split(b"\0")[:-1]
    assert names.count(b"compatible") == 1
    assert len(names) == len(set(names))
    assert set(names) == {
        b"#address-cells",
        b"#size-cells",
        b"compatible",
        b"reg",
        b"dma-base",
        b"dma-coherent",
        b"blob",
    }


def test_phandles_count_from_one() -> None:
    w = FdtWriter()
    assert [w.alloc_phandle(), w.alloc_phandle(), w.alloc_phandle()] == [1, 2, 3]


def _root() -> FdtWriter:
    w = FdtWriter()
    w.begin_node("")
    return w


@pytest.mark.parametrize(
    "misuse",
    [
        lambda w: w.end_node() or w.end_node(),  # closes the root, then one too many
        lambda w: w.begin_node("a") or w.end_node() or w.property_u32("late", 1),  # property after child
        lambda w: w.property_u32("x", 1) or w.property_u32("x", 2),  # duplicate property
        lambda w: w.begin_node("a") or w.end_node() or w.begin_node("a"),  # duplicate node
        lambda w: w.end_node() or w.begin_node(""),  # a second root
        lambda w: w.finish(),  # root still open
        lambda w: w.property_u32("x", -1),
        lambda w: w.property_u32("x", 1 << 32),
        lambda w: w.property_u64("x", 1 << 64),
        lambda w: w.property_string("x", "a\0b"),
        lambda w: w.property_strings("x"),
        lambda w: w.begin_node("a") or w.finish(),  # a node still open
    ],
)
def test_misuse_raises_value_error(misuse: Any) -> None:
    with pytest.raises(ValueError):
        misuse(_root())


@pytest.mark.parametrize("name", ["", "1cpu", "a" * 32, "cp u", "cpu/0", "é", "cpu@"])
def test_bad_node_names(name: str) -> None:
    with pytest.raises(ValueError, match="node name"):
        _root().begin_node(name)


@pytest.mark.parametrize("name", ["", "a" * 32, "bad name", "at@sign", "slash/"])
def test_bad_property_names(name: str) -> None:
    with pytest.raises(ValueError, match="property name"):
        _root().property_empty(name)


def test_good_names_pass() -> None:
    w = _root()
    w.property_u32("#interrupt-cells", 3)
    w.property_empty("linux,pci-probe-only?")
    w.begin_node("virtio_mmio@a000000")
    w.end_node()
    w.begin_node("a" * 31)
    w.end_node()
    w.end_node()
    parse_blob(w.finish())


def test_root_rules() -> None:
    with pytest.raises(ValueError, match="root"):
        FdtWriter().begin_node("x")
    with pytest.raises(ValueError, match="no root"):
        FdtWriter().finish()
    with pytest.raises(ValueError, match="outside any node"):
        FdtWriter().property_empty("x")
    w = _root()
    w.end_node()
    w.finish()
    with pytest.raises(ValueError, match="already called"):
        w.finish()


@needs_dtc
def test_dtc_reads_the_writer_output() -> None:
    dts = parse_dts(decompile(small_tree()))
    dev = dts["children"]["dev@1000"]["props"]
    assert dev["compatible"] == '"test,dev-v2\\0test,dev"'
    assert cells(dev["reg"]) == [0, 0x1000, 0x10]
    assert cells(dev["dma-base"]) == [0, 0x1000]
    assert dev["dma-coherent"] == ""
    assert dev["blob"] == "[01 02 03]"


# -- the machine's tree -----------------------------------------------------------------------------
def machine_tree(gic: int, cpus: int, nvirtio: int, *, initrd: bool = True, uart: bool = True) -> bytes:
    return build_device_tree(
        ram=layout.ram_layout(512 * MiB),
        cpus=cpus,
        cmdline="console=ttyS0 root=/dev/vda rw",
        initrd=(0x5000_0000, 0x5012_3456) if initrd else None,
        gic_version=gic,
        virtio=[layout.virtio_mmio_slot(i) for i in range(nvirtio)],
        uart=uart,
    )


def _check_machine(dts: Node, gic: int, cpus: int, nvirtio: int, initrd: bool) -> None:
    root = dts["props"]
    kids = dts["children"]
    assert cells(root["#address-cells"]) == [2] and cells(root["#size-cells"]) == [2]
    assert root["compatible"] == '"linux,pyvmm"' and "model" in root

    chosen = kids["chosen"]["props"]
    assert chosen["bootargs"] == '"console=ttyS0 root=/dev/vda rw"'
    assert chosen["stdout-path"] == f'"{uart_path()}"' == '"/serial@9000000"'
    if initrd:
        assert cells(chosen["linux,initrd-start"]) == [0, 0x5000_0000]
        assert cells(chosen["linux,initrd-end"]) == [0, 0x5012_3456]
    else:
        assert "linux,initrd-start" not in chosen and "linux,initrd-end" not in chosen
    assert kids["aliases"]["props"]["serial0"] == '"/serial@9000000"'

    mem = kids["memory@40000000"]["props"]
    assert mem["device_type"] == '"memory"'
    assert cells(mem["reg"]) == [0, layout.RAM_START, 0, 512 * MiB]

    cpus_node = kids["cpus"]
    assert cells(cpus_node["props"]["#address-cells"]) == [1]
    assert cells(cpus_node["props"]["#size-cells"]) == [0]
    assert sorted(cpus_node["children"]) == sorted(f"cpu@{n:x}" for n in range(cpus))
    for n in range(cpus):
        cpu = cpus_node["children"][f"cpu@{n:x}"]["props"]
        assert cells(cpu["reg"]) == [n]
        assert cpu["device_type"] == '"cpu"' and cpu["enable-method"] == '"psci"'

    psci = kids["psci"]["props"]
    assert psci["compatible"] == '"arm,psci-1.0\\0arm,psci-0.2"' and psci["method"] == '"hvc"'

    timer = kids["timer"]["props"]
    flags = 0x4 | ((((1 << cpus) - 1) << 8) if gic == 2 else 0)
    assert cells(timer["interrupts"]) == [1, 13, flags, 1, 14, flags, 1, 11, flags, 1, 10, flags]
    assert timer["always-on"] == "" and timer["compatible"] == '"arm,armv8-timer"'

    intc = kids["interrupt-controller@8000000"]["props"]
    assert "interrupt-controller" in intc and cells(intc["#interrupt-cells"]) == [3]
    if gic == 3:
        assert intc["compatible"] == '"arm,gic-v3"'
        assert cells(intc["reg"]) == [0, 0x0800_0000, 0, 0x1_0000, 0, 0x080A_0000, 0, 0x2_0000 * cpus]
    else:
        assert intc["compatible"] == '"arm,cortex-a15-gic"'
        assert cells(intc["reg"]) == [0, 0x0800_0000, 0, 0x1_0000, 0, 0x0801_0000, 0, 0x2000]
    # the phandle reference resolves: the root's interrupt-parent is the GIC's phandle, and no other
    # node claims it
    assert cells(root["interrupt-parent"]) == cells(intc["phandle"])
    assert sum("phandle" in k["props"] for k in kids.values()) == 1

    uart = kids["serial@9000000"]["props"]
    assert uart["compatible"] == '"ns16550a"'
    assert cells(uart["reg"]) == [0, 0x0900_0000, 0, 0x1000]
    assert cells(uart["interrupts"]) == [0, layout.UART_SPI, 1]
    assert cells(uart["clock-frequency"]) == [1843200]
    assert cells(uart["reg-shift"]) == [0] and cells(uart["reg-io-width"]) == [1]

    virtio = sorted(k for k in kids if k.startswith("virtio_mmio@"))
    assert virtio == sorted(f"virtio_mmio@{0x0A00_0000 + 0x1000 * i:x}" for i in range(nvirtio))
    for i in range(nvirtio):
        v = kids[f"virtio_mmio@{0x0A00_0000 + 0x1000 * i:x}"]["props"]
        assert v["compatible"] == '"virtio,mmio"' and v["dma-coherent"] == ""
        assert cells(v["reg"]) == [0, 0x0A00_0000 + 0x1000 * i, 0, 0x1000]
        assert cells(v["interrupts"]) == [0, layout.VIRTIO_SPI_BASE + i, 1]

    # bindings/misc/pvpanic-mmio.txt: compatible and a 2-byte reg; and our guest exit device's page
    pvpanic = kids["pvpanic-mmio@9001000"]["props"]
    assert pvpanic == {"compatible": '"qemu,pvpanic-mmio"', "reg": "<0x00 0x9001000 0x00 0x02>"}
    assert cells(kids["guest-exit@9002000"]["props"]["reg"]) == [0, 0x0900_2000, 0, 0x1000]
    assert kids["guest-exit@9002000"]["props"]["compatible"] == '"pyvmm,guest-exit"'


@needs_dtc
@pytest.mark.parametrize("gic", [3, 2])
@pytest.mark.parametrize("cpus", [1, 4])
@pytest.mark.parametrize("nvirtio", [0, 3])
def test_machine_tree_decompiles_cleanly(gic: int, cpus: int, nvirtio: int) -> None:
    initrd = nvirtio > 0  # both with and without an initrd across the matrix
    blob = machine_tree(gic, cpus, nvirtio, initrd=initrd)
    text = decompile(blob)  # asserts dtc printed no warning
    _check_machine(parse_dts(text), gic, cpus, nvirtio, initrd)


@needs_dtc
@pytest.mark.parametrize("gic", [3, 2])
def test_machine_tree_round_trips_through_dtc(gic: int, tmp_path: Path) -> None:
    blob = machine_tree(gic, 4, 3)
    text = decompile(blob)
    r = dtc("-I", "dts", "-O", "dtb", "-o", "-", "-", stdin=text.encode())
    assert r.returncode == 0 and r.stderr.decode() == "", r.stderr.decode()
    again = r.stdout
    assert decompile(again) == text
    # Same tree (names, property order and values) read by our own parser from both blobs; they differ
    # only in the strings block, where dtc also shares suffixes of names.
    assert parse_blob(again)[0] == parse_blob(blob)[0]
    assert HEADER.unpack_from(again, 0)[5:8] == HEADER.unpack_from(blob, 0)[5:8]  # version, last, cpu


def test_machine_tree_without_uart() -> None:
    root, _ = parse_blob(machine_tree(3, 1, 1, uart=False))
    assert not any(k.startswith("serial@") for k in root["children"])
    assert "aliases" not in root["children"]
    assert "stdout-path" not in root["children"]["chosen"]["props"]


def test_rng_seed_goes_to_chosen() -> None:
    blob = build_device_tree(
        ram=[(layout.RAM_START, 64 * MiB)],
        cpus=1,
        cmdline="",
        initrd=None,
        gic_version=3,
        virtio=[],
        rng_seed=b"\x11" * 32,
    )
    root, _ = parse_blob(blob)
    assert root["children"]["chosen"]["props"]["rng-seed"] == b"\x11" * 32


def test_several_ram_regions_each_get_a_memory_node() -> None:
    ram = [(layout.RAM_START, 256 * MiB), (0x1_0000_0000, 1 << 30)]
    root, _ = parse_blob(
        build_device_tree(ram=ram, cpus=1, cmdline="", initrd=None, gic_version=3, virtio=[])
    )
    assert u32s(root["children"]["memory@100000000"]["props"]["reg"]) == [1, 0, 0, 1 << 30]
    assert "memory@40000000" in root["children"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gic_version": 4}, "gic_version"),
        ({"cpus": 0}, "cpus"),
        ({"cpus": layout.MAX_CPUS + 1}, "cpus"),
        ({"ram": []}, "RAM"),
        ({"virtio": [layout.virtio_mmio_slot(0)] * (layout.VIRTIO_MMIO_MAX + 1)}, "virtio"),
        ({"cmdline": "a\0b"}, "NUL"),
        ({"initrd": (0x2000, 0x1000)}, "initrd"),
    ],
)
def test_build_device_tree_rejects(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "ram": [(layout.RAM_START, 64 * MiB)],
        "cpus": 1,
        "cmdline": "",
        "initrd": None,
        "gic_version": 3,
        "virtio": [],
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_device_tree(**args)


def test_mpidr_affinity_matches_kvm_reset_mpidr() -> None:
    assert [mpidr_affinity(n) for n in range(16)] == list(range(16))
    assert mpidr_affinity(16) == 0x100 and mpidr_affinity(0x1234) == 0x12304

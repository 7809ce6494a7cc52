"""A /proc/cpuinfo and a /sys/devices/system/cpu for the CPU this arm64 process runs on, for a userland under
QEMU user-mode emulation.

    python3 cpuinfo.py CPUS OUT    (run by the arm64 python, with QEMU_CPU set as the board's processes have it)

writes OUT/cpuinfo and OUT/cpu/ (possible, present, online, and per CPU its topology and
regs/identification/midr_el1, where ExecuTorch reads the core type), which arm64_board.sh bind-mounts over
/proc/cpuinfo and /sys/devices/system/cpu. qemu-aarch64 (7.2) passes the host's x86 /proc/cpuinfo and sysfs
through, which XNNPACK's cpuinfo cannot parse, so it refuses to start. This writes what Linux on that CPU would
show: the features are the AT_HWCAP/AT_HWCAP2 bits QEMU hands this process (the same bits cpuinfo and the
kernels' dispatch read through getauxval), and the implementer/part/variant/revision are MIDR_EL1 as the emulated
CPU answers an ``mrs`` (Linux lets EL0 read the ID registers; so does QEMU), so ``CPUS`` processors show the CPU
that QEMU_CPU names, and nothing else.
"""

import ctypes
import mmap
import sys
from pathlib import Path

AT_HWCAP, AT_HWCAP2 = 16, 26
# arch/arm64/kernel/cpuinfo.c's hwcap_str, in the kernel's order: AT_HWCAP bits 0.., then AT_HWCAP2 bits 0..
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
         "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 "
          "i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 "
          "smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1 sme2 sme2p1 smei16i32 smebi32i32 smeb16b16 "
          "smef16f16 mops hbc").split()
MRS_MIDR_RET = bytes.fromhex("000038d5" "c0035fd6")  # mrs x0, midr_el1; ret (little-endian A64)


def midr() -> int:
    """MIDR_EL1, read by running the two instructions above from an executable page."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(MRS_MIDR_RET)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_uint64)(address)()


def features() -> list[str]:
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    words = ((getauxval(AT_HWCAP), HWCAP), (getauxval(AT_HWCAP2), HWCAP2))
    return [name for bits, names in words for bit, name in enumerate(names) if bits >> bit & 1]


def main() -> None:
    cpus, out = int(sys.argv[1]), Path(sys.argv[2])
    value, names = midr(), " ".join(features())
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {names}\nCPU implementer\t: 0x{value >> 24 & 0xff:02x}\n"
             f"CPU architecture: 8\nCPU variant\t: 0x{value >> 20 & 0xf:x}\nCPU part\t: 0x{value >> 4 & 0xfff:03x}\n"
             f"CPU revision\t: {value & 0xf}\n\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpuinfo").write_text("".join(f"processor\t: {cpu}\n{block}" for cpu in range(cpus)))
    every = f"0-{cpus - 1}" if cpus > 1 else "0"
    files = {"possible": every, "present": every, "online": every, "kernel_max": str(cpus - 1)}
    for cpu in range(cpus):  # one cluster of single-thread cores, as on a Pi 5 or an N1 server
        files |= {f"cpu{cpu}/online": "1", f"cpu{cpu}/regs/identification/midr_el1": f"0x{value:016x}",
                  f"cpu{cpu}/regs/identification/revidr_el1": "0x0000000000000000",
                  f"cpu{cpu}/topology/physical_package_id": "0", f"cpu{cpu}/topology/cluster_id": "0",
                  f"cpu{cpu}/topology/core_id": str(cpu), f"cpu{cpu}/topology/thread_siblings_list": str(cpu),
                  f"cpu{cpu}/topology/core_siblings_list": every, f"cpu{cpu}/topology/cluster_cpus_list": every}
    for name, text in files.items():
        (out / "cpu" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "cpu" / name).write_text(text + "\n")


if __name__ == "__main__":
    main()

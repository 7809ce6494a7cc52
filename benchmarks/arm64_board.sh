#!/usr/bin/env bash
# An emulated arm64 board that edgeforge reaches as a real `ssh` device (issue 13, item 5).
#
#   bash benchmarks/arm64_board.sh [--cpu NAME]   build what is missing, start the board's sshd, check it
#   bash benchmarks/arm64_board.sh --start        the same without the checks (about 11 min here)
#   bash benchmarks/arm64_board.sh --check        only the checks, on the running board
#   bash benchmarks/arm64_board.sh --stop         stop the sshd (by its PID) and unmount the userland
#
# Needs root and apt on a Debian x86_64 host. Everything lies under benchmarks/work/arm64/ (git ignores it):
#   root/        a Debian bookworm arm64 userland (mmdebstrap; Python 3.11, and libpython3.11, which ExecuTorch's
#                Python binding links), its venv /opt/edgeforge with the aarch64 wheels of arm64/requirements.txt
#                and edgeforge itself, copied from this checkout (rerunning the script reinstalls that copy, so
#                the board runs the code you have)
#   wheels/      those wheels, downloaded from PyPI by the host's pip (native speed, the host's own index
#                configuration as it is) and installed by the userland's pip with --no-index --no-deps
#   ssh/         throwaway host and client keys, authorized_keys, known_hosts, sshd_config
#   farm.toml    the board as an `ssh` device named arm64 (edgeforge bench/devices/verify --farm)
#
# How arm64 code runs: qemu-user-static's binfmt_misc entry for aarch64 (flags F: the interpreter is opened
# when it is registered, so it works inside the chroot without a copy there). The host's OpenSSH server
# authenticates and then chroots into root/ (ChrootDirectory): the login shell and everything it starts are
# arm64 binaries, each run under qemu-aarch64 as the CPU QEMU_CPU names (sshd's SetEnv), so `uname -m` says
# aarch64 and XNNPACK/KleidiAI and MLAS dispatch to that CPU's arm64 kernels. SFTP is sshd's internal-sftp in
# the same chroot. qemu 7.2 shows the host's x86 /proc/cpuinfo, which XNNPACK's cpuinfo cannot parse, and
# ExecuTorch reads MIDR from sysfs: arm64/cpuinfo.py writes both from what the emulated CPU reports, and they
# are bind-mounted over /proc/cpuinfo and /sys/devices/system/cpu.
#
# --cpu NAME: a qemu-aarch64 CPU (qemu-aarch64-static -cpu help), default cortex-a76 (Raspberry Pi 5's core:
# dotprod, no i8mm); max adds i8mm, SVE2 and SME. Changing it needs --stop first.
#
# Emulated timings are not speed: under QEMU an instruction costs what its translation costs on the x86 host,
# nothing like the arm64 core's. bench on this board prints tokens/s (the farm labels it emulated = "qemu");
# those numbers check that the path works end to end, never how fast an arm64 device is. Use the board for
# correctness: outputs and drift on arm64's instruction set.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
WORK="$HERE/work/arm64"
ROOT="$WORK/root"
WHEELS="$WORK/wheels"
KEYS="$WORK/ssh"
FARM="$WORK/farm.toml"
PIDFILE="$WORK/sshd.pid"
SUITE=bookworm
VENV=/opt/edgeforge
BOARD=/opt/edgeforge-board  # inside the userland: arm64/*.py and the requirements
CPU=cortex-a76
ACTION=build

while (($#)); do
    case "$1" in
        --cpu) CPU="${2:?--cpu needs a name}"; shift 2 ;;
        --check) ACTION=check; shift ;;
        --start) ACTION=start; shift ;;
        --stop) ACTION=stop; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "arm64_board.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "arm64_board.sh: $*" >&2; exit 1; }
step() { echo "== $* ($(date -u +%H:%M:%S))" >&2; }

in_userland() {  # in_userland CMD...: CMD in the arm64 userland, as the board's ssh sessions run it
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$CPU" "$@"
}

sshd_running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

# ---- the host: qemu, binfmt_misc, mmdebstrap, OpenSSH ----

host_tools() {
    local missing=()
    for pair in qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support mmdebstrap:mmdebstrap \
                /usr/sbin/sshd:openssh-server ssh:openssh-client; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if ((${#missing[@]})); then
        step "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive nice -n 10 apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

binfmt() {
    [[ -e /proc/sys/fs/binfmt_misc/register ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
        || die "binfmt_misc cannot be mounted here, so arm64 binaries cannot run under qemu-aarch64"
    update-binfmts --enable qemu-aarch64 2>/dev/null || true  # "already enabled" is not a failure
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
        || die "the qemu-aarch64 binfmt_misc entry is missing or lacks the F flag (update-binfmts --display)"
}

# ---- the userland and its venv ----

userland() {
    if [[ -f "$ROOT/.edgeforge-userland" ]]; then return; fi
    [[ ! -e "$ROOT" ]] || die "$ROOT exists but is unfinished: run --stop, remove it and rerun"
    step "mmdebstrap: Debian $SUITE arm64 into $ROOT"
    mkdir -p "$WORK"
    nice -n 10 mmdebstrap --quiet --arch=arm64 --variant=apt \
        --include=python3,python3-venv,python3-pip,libpython3.11,ca-certificates,libgomp1,libstdc++6 \
        "$SUITE" "$ROOT" http://deb.debian.org/debian
    touch "$ROOT/.edgeforge-userland"
}

wheels() {
    local pip=(python3 -m pip) platforms=()
    [[ -x "$REPO/.venv/bin/pip" ]] && pip=("$REPO/.venv/bin/pip")
    for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done  # bookworm: glibc 2.36
    step "pip download: aarch64 wheels into $WHEELS"
    mkdir -p "$WHEELS"
    nice -n 10 "${pip[@]}" download -q --dest "$WHEELS" --no-deps --only-binary=:all: "${platforms[@]}" \
        --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp -r "$HERE/arm64/requirements.txt" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)  # the host's per-package find-links
}

mount_once() {  # mount_once TARGET MOUNT-ARGS...: mount unless TARGET already is a mount point
    mountpoint -q "$1" || mount "${@:2}" "$1"
}

mount_userland() {
    mount_once "$ROOT/proc" -t proc proc
    mount_once "$ROOT/sys" -t sysfs -o ro sysfs
    mount_once "$ROOT/dev" --bind /dev
    mkdir -p "$ROOT$BOARD"
    cp "$HERE"/arm64/*.py "$HERE/arm64/requirements.txt" "$ROOT$BOARD/"
    if ! mountpoint -q "$ROOT/proc/cpuinfo"; then
        local out="$BOARD/cpu-$CPU"
        rm -rf "$ROOT$out"
        in_userland /usr/bin/python3 "$BOARD/cpuinfo.py" "$(nproc --all)" "$out"
        out="$ROOT$out"
        mount --bind "$out/cpuinfo" "$ROOT/proc/cpuinfo"
        mount --bind "$out/cpu" "$ROOT/sys/devices/system/cpu"
        echo "$CPU" > "$WORK/cpu"
    fi
    [[ "$(cat "$WORK/cpu")" == "$CPU" ]] || die "the board runs CPU $(cat "$WORK/cpu"), not $CPU: --stop first"
}

unmount_userland() {
    for target in "$ROOT/mnt/wheels" "$ROOT/sys/devices/system/cpu" "$ROOT/proc/cpuinfo" "$ROOT/dev" \
                  "$ROOT/sys" "$ROOT/proc"; do
        if [[ -e "$target" ]] && mountpoint -q "$target"; then umount "$target"; fi
    done
}

venv() {
    if [[ ! -f "$ROOT$VENV/.edgeforge-venv" ]]; then
        step "the userland's pip: $(grep -c '^[a-z]' "$HERE/arm64/requirements.txt") wheels into $VENV (--no-deps)"
        mkdir -p "$ROOT/mnt/wheels"
        mount_once "$ROOT/mnt/wheels" --bind -o ro "$WHEELS"
        in_userland /usr/bin/python3 -m venv "$VENV"
        nice -n 10 chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root QEMU_CPU="$CPU" \
            "$VENV/bin/pip" install -q --disable-pip-version-check --no-index --no-deps --find-links /mnt/wheels \
            -r "$BOARD/requirements.txt"
        umount "$ROOT/mnt/wheels"
        touch "$ROOT$VENV/.edgeforge-venv"
    fi
    step "edgeforge from $REPO into $VENV"
    rm -rf "$ROOT/opt/edgeforge-src" && mkdir -p "$ROOT/opt/edgeforge-src"
    tar -C "$REPO" --exclude=__pycache__ -cf - pyproject.toml README.md edgeforge \
        | tar -C "$ROOT/opt/edgeforge-src" -xf -
    nice -n 10 chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root QEMU_CPU="$CPU" \
        "$VENV/bin/pip" install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation \
        /opt/edgeforge-src
}

# ---- the sshd, its keys and the farm file ----

start_sshd() {
    if sshd_running; then echo "sshd already running (PID $(cat "$PIDFILE")); farm: $FARM" >&2; return; fi
    mkdir -p "$KEYS" /run/sshd
    [[ -f "$KEYS/host_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C arm64-board-host -f "$KEYS/host_ed25519"
    [[ -f "$KEYS/client_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C arm64-board-client -f "$KEYS/client_ed25519"
    cp "$KEYS/client_ed25519.pub" "$KEYS/authorized_keys"
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$KEYS/host_ed25519.pub")" > "$KEYS/known_hosts"
    cat > "$KEYS/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $KEYS/host_ed25519
PidFile $PIDFILE
AuthorizedKeysFile $KEYS/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowUsers root
ChrootDirectory $ROOT
SetEnv QEMU_CPU=$CPU
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
EOF
    /usr/sbin/sshd -f "$KEYS/sshd_config" -E "$WORK/sshd.log"
    for _ in $(seq 50); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), timeout=1).close()" 2>/dev/null \
            && break
        sleep 0.2
    done
    sshd_running || die "sshd did not start: $(tail -3 "$WORK/sshd.log")"
    cat > "$FARM" <<EOF
# The emulated arm64 board of benchmarks/arm64_board.sh: an OpenSSH server on this host whose sessions run in
# a Debian arm64 userland under qemu-aarch64 ($CPU). Its timings are emulation's, not an arm64 device's speed.
[[device]]
name = "arm64"
kind = "ssh"
labels = { os = "linux", arch = "aarch64", cpu = "$CPU", emulated = "qemu" }
timeout_s = 1800  # everything is ~10-50x slower emulated: one generous deadline for every call
host = "127.0.0.1"
port = $port
user = "root"
identity_file = "ssh/client_ed25519"
known_hosts = "ssh/known_hosts"
python = "$VENV/bin/python"
workdir = "/var/tmp/edgeforge"
EOF
    echo "sshd PID $(cat "$PIDFILE") on 127.0.0.1:$port; farm: $FARM" >&2
}

stop() {
    if sshd_running; then
        local pid
        pid=$(cat "$PIDFILE")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        echo "sshd PID $pid stopped" >&2
    fi
    rm -f "$PIDFILE"
    unmount_userland
}

# ---- checks ----

board() {  # board CMD: CMD over ssh on the board, host key checked against known_hosts, key auth only
    local port
    port=$(sed -n 's/^port = //p' "$FARM")
    ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes \
        -o UserKnownHostsFile="$KEYS/known_hosts" -i "$KEYS/client_ed25519" -p "$port" root@127.0.0.1 "$1"
}

check() {
    sshd_running || die "the board is not running: run this script without --check first"
    local edgeforge="$REPO/.venv/bin/edgeforge" python="$REPO/.venv/bin/python" out="$WORK/check"
    step "check: uname -m over ssh"
    [[ "$(board 'uname -m')" == aarch64 ]] || die "uname -m over ssh is not aarch64"
    echo "uname -m: aarch64"
    step "check: the arm64 venv imports its runtimes (emulated: slow)"
    board "$VENV/bin/python -c 'import platform, torch, onnxruntime, executorch.runtime, edgeforge
print(platform.machine(), torch.__version__, onnxruntime.__version__, edgeforge.__version__)'"
    mkdir -p "$out"
    export OMP_NUM_THREADS=1
    if [[ ! -f "$out/pte/edgeforge.json" ]]; then
        step "check: stories260K int4-xnnpack .pte (target host) and ONNX (onnx-cpu) on x86"
        rm -rf "$out"/q-host "$out"/q-onnx "$out"/pte "$out"/onnx
        nice -n 10 "$edgeforge" quantize --recipe int4-xnnpack --target host -o "$out/q-host"
        nice -n 10 "$edgeforge" export "$out/q-host" --target host -o "$out/pte"
        nice -n 10 "$edgeforge" quantize --recipe int4-xnnpack --target onnx-cpu -o "$out/q-onnx"
        nice -n 10 "$edgeforge" export "$out/q-onnx" --target onnx-cpu -o "$out/onnx"
    fi
    rm -rf "$ROOT/var/tmp/edgeforge-check" && mkdir -p "$ROOT/var/tmp/edgeforge-check"
    for artifact in pte onnx; do
        step "check: $artifact logits, x86 against arm64"
        cp -r "$out/$artifact" "$ROOT/var/tmp/edgeforge-check/"
        nice -n 10 "$python" "$HERE/arm64/logits.py" "$out/$artifact" "$out/$artifact-x86.npy" 2>/dev/null
        board "$VENV/bin/python $BOARD/logits.py /var/tmp/edgeforge-check/$artifact \
               /var/tmp/edgeforge-check/$artifact-arm64.npy 2>/dev/null"
        cp "$ROOT/var/tmp/edgeforge-check/$artifact-arm64.npy" "$out/"
        "$python" -c "
import numpy as np
x86, arm = np.load('$out/$artifact-x86.npy'), np.load('$out/$artifact-arm64.npy')
print(f'$artifact: logits {x86.shape}, max |x86| {abs(x86).max():.3f}, max |x86 - arm64| {abs(x86 - arm).max():.3g}, '
      f'argmax agree {(x86.argmax(-1) == arm.argmax(-1)).mean():.3f}')"
    done
    step "check: edgeforge bench over the farm (correctness only: emulated timings are not speed)"
    rm -rf "$out/bench"
    nice -n 10 "$edgeforge" bench "$out/pte" "$out/onnx" --farm "$FARM" --devices arm64 -o "$out/bench" \
        --prompt-lengths 16 --decode-tokens 8 -r 2 --bandwidth-mib 16
}

[[ $EUID -eq 0 ]] || die "needs root (chroot, mounts, binfmt_misc, sshd)"
case "$ACTION" in
    stop) stop ;;
    check) check ;;
    build|start)
        start=$(date +%s)
        host_tools
        binfmt
        userland
        wheels
        mount_userland
        venv
        start_sshd
        echo "board built and started in $(( $(date +%s) - start )) s; $(du -shx "$ROOT" | cut -f1) userland," \
             "$(du -sh "$WHEELS" | cut -f1) wheels" >&2
        if [[ "$ACTION" == build ]]; then check; fi
        ;;
esac

#!/bin/sh
# Installs the Shoal agent on a host (docs/install.md):
#   $ROOT/usr/local/bin/shoal                           the binary (0755)
#   $ROOT/etc/systemd/system/shoal-agent.service        the systemd unit (0644)
#   $ROOT/etc/shoal        (0700)   for agent.toml and identity/, written by `shoal init`
#   $ROOT/var/lib/shoal    (0700)   the agent's data directory
#
# Usage: install.sh --binary PATH [--root DIR] [--unit PATH]
#   --binary PATH  the `shoal` binary to install (from `cargo build --release`, say)
#   --root DIR     install under DIR instead of / (an image, a chroot, a test's scratch
#                  directory); systemctl is then never called
#   --unit PATH    the unit file; default: shoal-agent.service beside this script
#
# It may be run again: each file is replaced whole, directories are kept (their mode is
# set again), and nothing else is touched. It never writes the configuration: that is
# `shoal init`'s job.
set -eu

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

root=/
binary=
unit=$(dirname -- "$0")/shoal-agent.service

while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || usage; root=$2; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --binary) [ $# -ge 2 ] || usage; binary=$2; shift 2 ;;
        --binary=*) binary=${1#--binary=}; shift ;;
        --unit) [ $# -ge 2 ] || usage; unit=$2; shift 2 ;;
        --unit=*) unit=${1#--unit=}; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage ;;
    esac
done

[ -n "$binary" ] || die "say which binary to install: --binary PATH (target/release/shoal, say)"
case $binary in
    */*) ;;
    *) binary=./$binary ;; # a bare name is a file here, never one found on PATH
esac
[ -f "$binary" ] || die "--binary $binary: no such file"
[ -x "$binary" ] || die "--binary $binary: not executable"
[ -f "$unit" ] || die "--unit $unit: no such file"
[ -n "$root" ] || die "--root is empty"
[ -d "$root" ] || die "--root $root: no such directory"
# The binary must be one that runs here (the right architecture, not a truncated copy).
"$binary" --version >/dev/null 2>&1 || die "--binary $binary: does not run here (\`$binary --version\` failed)"

# Paths under the root, with no doubled slash when the root is /: the prefix is the root
# without its trailing slashes, empty for /.
# The root's real path, so `/.` or a link to / counts as the live system.
prefix=$(cd -P -- "$root" && pwd) || die "--root $root: cannot enter it"
[ "$prefix" = / ] && prefix=

# Copies $1 to $2 with mode $3: to a temporary name beside it, then renamed over it, so a
# running agent's binary is replaced, never written into.
place() {
    tmp="$2.tmp.$$"
    rm -f -- "$tmp"
    cp -- "$1" "$tmp"
    chmod "$3" "$tmp"
    mv -f -- "$tmp" "$2"
    echo "installed $2"
}

# Under another root, nothing may lead out of it: a directory on the way that is a
# symbolic link (an image with etc/shoal -> /etc, say) is refused before anything is
# written, so the real system is never touched.
if [ "$prefix" != "" ]; then
    for p in usr usr/local usr/local/bin usr/local/bin/shoal etc etc/systemd \
        etc/systemd/system etc/systemd/system/shoal-agent.service etc/shoal var var/lib \
        var/lib/shoal; do
        [ -L "$prefix/$p" ] && die "$prefix/$p is a symbolic link: refusing to write through it"
    done
fi

mkdir -p -- "$prefix/usr/local/bin" "$prefix/etc/systemd/system"
place "$binary" "$prefix/usr/local/bin/shoal" 0755
place "$unit" "$prefix/etc/systemd/system/shoal-agent.service" 0644

for dir in "$prefix/etc/shoal" "$prefix/var/lib/shoal"; do
    mkdir -p -- "$dir"
    chmod 0700 "$dir"
    echo "made $dir (0700)"
done

# Written to disk before this says it is done: cloud-init runs it once.
sync

if [ "$prefix" = "" ]; then
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        echo "systemd reloaded"
        if systemctl is-active --quiet shoal-agent; then
            echo "the agent runs the old binary until: systemctl restart shoal-agent"
        fi
    else
        echo "systemd is not running here: run \`shoal agent --config /etc/shoal/agent.toml\` under your supervisor"
    fi
    cat <<'NEXT'

Next, on this host:
  shoal init --name NAME --identity DIR --seed ADDR [--tag KEY=VALUE]...
      (DIR: this host's identity from `shoal ca issue`; see docs/install.md)
  systemctl enable --now shoal-agent
NEXT
else
    echo "installed under $root; systemctl was not called"
fi

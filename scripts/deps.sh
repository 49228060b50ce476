#!/usr/bin/env bash
# Install the Debian packages that the given jobs need (scripts/apt-deps.txt) and that are not installed yet.
#
#   scripts/deps.sh [--print] [JOB...]
#
# JOB is a job named in apt-deps.txt (images, lab, arm64, firmware, test) or one of:
#   run     what `make run` needs: the default guest's build, and the x86 KVM lab's where this host's KVM
#           is a software one that cannot run guest user space (the Makefile's run target then boots the
#           guest in the lab)
#   bench   make bench, bench-lab and stress-lab: the default guest, the x86 lab, the firmware/ tiny guests
#   all     every package (also test, and no JOB at all: make deps, make test and CI)
# --print lists the packages of those jobs, one a line, and installs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
list="$here/apt-deps.txt"
# A software KVM (the kvm_pvm module) is detected as pyvmm/arch/x86_64/hostkvm.py does; the tests point
# this at a directory of their own.
sys_module=${PYVMM_DEPS_SYS_MODULE:-/sys/module}

print=0
jobs=()
for arg in "$@"; do
    case "$arg" in
        --print) print=1 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) echo "deps: unknown option $arg" >&2; exit 2 ;;
        *) jobs+=("$arg") ;;
    esac
done

# The jobs apt-deps.txt names in its group lines.
mapfile -t known < <(sed -n 's/^\[\(.*\)\]\s*$/\1/p' "$list" | tr ' ' '\n' | grep -vx '\*' | sort -u)

# Expand the combined jobs; "all" stands for every group.
want_jobs=()
[ ${#jobs[@]} -gt 0 ] || jobs=(all)
for job in "${jobs[@]}"; do
    case "$job" in
        all|test) want_jobs+=(all) ;;
        run)
            want_jobs+=(images)
            [ -e "$sys_module/kvm_pvm" ] && want_jobs+=(lab)
            ;;
        bench) want_jobs+=(images lab firmware) ;;
        *)
            if ! printf '%s\n' "${known[@]}" | grep -qxF -- "$job"; then
                echo "deps: unknown job $job (jobs: run bench all ${known[*]})" >&2
                exit 2
            fi
            want_jobs+=("$job")
            ;;
    esac
done

# The packages of every group that names one of want_jobs (or "*"), in file order, each once.
want=()
take=0
while IFS= read -r line || [ -n "$line" ]; do
    line="${line%%#*}"
    read -r -a words <<<"$line" || true
    [ ${#words[@]} -gt 0 ] || continue
    if [[ "${words[0]}" == \[* ]]; then
        read -r -a group <<<"$(tr -d '[]' <<<"$line")"
        take=0
        for g in "${group[@]}"; do
            for j in "${want_jobs[@]}"; do
                if [ "$g" = "*" ] || [ "$g" = "$j" ] || [ "$j" = all ]; then take=1; fi
            done
        done
        continue
    fi
    if [ "$take" -eq 1 ] && ! printf '%s\n' "${want[@]}" | grep -qxF -- "${words[0]}"; then
        want+=("${words[0]}")
    fi
done <"$list"

if [ "$print" -eq 1 ]; then
    printf '%s\n' "${want[@]}"
    exit 0
fi

missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
what="${jobs[*]}"
if [ ${#missing[@]} -eq 0 ]; then
    echo "deps ($what): all ${#want[@]} Debian packages present"
    exit 0
fi
echo "deps ($what): installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"

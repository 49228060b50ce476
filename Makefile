# pyvmm: one target per job.  On a fresh Debian machine:
#   make run    installs what is missing, builds the default guest, boots it on this terminal
#   make test   the whole test suite (unit, tiny-guest KVM tests, real Linux boots)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# property-test examples per test (3 tests): >= 10,000 in all for make test; raise it for a long fuzz run
FUZZ_EXAMPLES ?= 3600

# The default guest: the minimal kernel from images/ with its ext4 root disk on virtio-blk (vda), as a
# snapshot: the shell's changes are dropped at exit and the built image stays what the tests expect.
KERNEL ?= images/out/vmlinux
ROOTFS ?= images/out/rootfs.ext4
MEMORY ?= 512M
RUN_ARGS ?= --kernel $(KERNEL) --disk path=$(ROOTFS),snapshot=on --memory $(MEMORY) \
            --cmdline "console=ttyS0 root=/dev/vda rw init=/init pyvmm.shell=1"
# The jobs with a deps-JOB target: the Debian packages of that job only (scripts/deps.sh JOB).
DEPS_JOBS := run images lab arm64 bench

.PHONY: all run test check images lab-images arm64-images debian-images bench bench-lab stress-lab soak firmware docs deps venv clean help \
        $(DEPS_JOBS:%=deps-%)

help:
	@echo "make run       boot the default guest (installs deps, builds images first)"
	@echo "make test      run every test (unit, kvm, boot)"
	@echo "make check     ruff + mypy --strict"
	@echo "make images    build the default guest kernel, initramfs and root disk"
	@echo "make firmware  build the tiny test guests"
	@echo "make docs      regenerate the diagrams in docs/ from their text sources (graphviz)"
	@echo "make lab-images  build the KVM lab kernel (QEMU TCG + nested KVM; see README \"KVM lab\")"
	@echo "make arm64-images  build the arm64 guest and the arm64 KVM lab (docs/aarch64.md)"
	@echo "make bench     device model, exit costs, kernel load, boot phases + memory (BENCH_ARGS=--quick: no boot)"
	@echo "make bench-lab   boot time, pyvmm side by side with QEMU-KVM microvm (in the lab if needed)"
	@echo "make stress-lab  boot the default guest STRESS_N times in a row (default 50; in one lab run if needed):"
	@echo "                 how many reached /init, each boot's time, pyvmm's stderr for every stall"
	@echo "                 (STRESS_ARGS=\"--root-disk --timeout 240\" for more options)"
	@echo "make soak      200 VMs in one process, then a guest busy with disk I/O for SOAK_MINUTES (10): RSS, fds"

# Debian packages (scripts/apt-deps.txt).  `make deps` installs every job's: make test and CI use it.  The
# other targets ask only for their own job's (deps-JOB: scripts/deps.sh JOB), so that `make run` gets the
# default guest's build and, on a software-KVM host, the x86 KVM lab's, and no arm64 toolchain.
deps:
	@scripts/deps.sh
$(DEPS_JOBS:%=deps-%):
	@scripts/deps.sh $(@:deps-%=%)

# The editable install in compat mode is one path in a .pth file: the default mode installs an import hook
# that every Python start (every `pyvmm run`) imports, 9 ms here and ~0.2 s in the KVM lab.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@

# Byte-compile pyvmm once here: with PYTHONDONTWRITEBYTECODE set (as on our machines) Python would
# otherwise compile every module from source at each `pyvmm run` (incremental: only changed files).
venv: $(STAMP)
	@$(PY) -m compileall -q pyvmm >/dev/null

images: deps-images venv
	$(PY) images/build.py

# The KVM lab's kernel (pyvmm/lab/): needed where the host KVM cannot run guest user space.
lab-images: deps-lab venv
	$(PY) images/lab.py

# The arm64 guest (cross-built kernel, busybox initramfs, ext4 root) and the arm64 KVM lab (Debian's arm64
# kernel and an arm64 root with Python): docs/aarch64.md.  Cached like the others.
arm64-images: deps-arm64 venv
	$(PY) images/arm64.py

# True (exit 0) when this host's /dev/kvm is a software KVM that cannot run guest user space.
SOFTWARE_KVM := $(PY) -c "from pyvmm.arch.x86_64 import hostkvm; raise SystemExit(not hostkvm.detect().software)"

firmware:
	$(MAKE) -s -C firmware

# Diagrams from their text sources (graphviz); the generated SVGs are committed.
docs: docs/virtio-walkthrough.svg

docs/virtio-walkthrough.svg: docs/virtio-walkthrough.dot
	dot -Tsvg $< -o $@

# On a software-KVM host `pyvmm.lab guest` runs the guest inside the KVM lab (and says why).
run: deps-run venv images
	@if $(SOFTWARE_KVM); then $(MAKE) -s lab-images; fi
	$(PY) -m pyvmm.lab guest -- $(RUN_ARGS)

# Debian's stock cloud kernel + an initramfs with its virtio modules (the ACPI discovery test).
DEBIAN_GUEST := images/out/debian-acpi/vmlinuz
$(DEBIAN_GUEST): images/debian_acpi.py
	$(PY) images/debian_acpi.py
debian-images: venv $(DEBIAN_GUEST)

test: deps venv images lab-images arm64-images debian-images firmware
	PYVMM_HYPOTHESIS_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (bench/README.md): tables on stdout, JSON in bench/out/.  BENCH_ARGS=--quick skips the boot.
BENCH_ARGS ?=
bench: venv images firmware
	@$(PY) -c "import psutil" 2>/dev/null || $(PY) -m pip install -q -e '.[bench]' --config-settings editable_mode=compat
	$(PY) bench/run.py $(BENCH_ARGS)

bench-lab: deps-bench venv images lab-images
	$(PY) bench/lab_boot.py

# N boots of the default guest in a row, each with its own --timeout, inside ONE lab run on a software-KVM host.
STRESS_N ?= 50
STRESS_ARGS ?=
stress-lab: deps-bench venv images lab-images
	$(PY) bench/stress_lab.py -n $(STRESS_N) $(STRESS_ARGS)

# Soak: 200 VMs in one process, then a guest doing mixed disk I/O for SOAK_MINUTES (default 10) with pyvmm's
# RSS and fds sampled; flat or not (bench/soak.py).  One-minute versions run in `make test`.
SOAK_MINUTES ?= 10
soak: deps-bench venv images lab-images firmware
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)

check: venv
	$(VENV)/bin/ruff check pyvmm tests images bench
	$(VENV)/bin/mypy

clean:
	rm -rf images/out firmware/out .pytest_cache .mypy_cache .ruff_cache

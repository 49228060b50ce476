# pyvmm: one target per job.  On a fresh Debian machine:
#   make run    installs what is missing, builds the default guest, boots it on this terminal
#   make test   the whole test suite (unit, tiny-guest KVM tests, real Linux boots)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# The default guest: the minimal kernel from images/ with its ext4 root disk on virtio-blk (vda).
KERNEL ?= images/out/vmlinux
ROOTFS ?= images/out/rootfs.ext4
MEMORY ?= 512M
RUN_ARGS ?= --kernel $(KERNEL) --disk path=$(ROOTFS) --memory $(MEMORY) \
            --cmdline "console=ttyS0 root=/dev/vda rw init=/init"

.PHONY: all run test check images firmware deps venv clean help

help:
	@echo "make run       boot the default guest (installs deps, builds images first)"
	@echo "make test      run every test (unit, kvm, boot)"
	@echo "make check     ruff + mypy --strict"
	@echo "make images    build the default guest kernel, initramfs and root disk"
	@echo "make firmware  build the tiny test guests"

deps:
	@scripts/deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

images: deps venv
	$(PY) images/build.py

firmware:
	$(MAKE) -s -C firmware

run: deps venv images
	$(PY) -m pyvmm run $(RUN_ARGS)

test: deps venv images firmware
	$(PY) -m pytest $(PYTEST_ARGS)

check: venv
	$(VENV)/bin/ruff check pyvmm tests images
	$(VENV)/bin/mypy

clean:
	rm -rf images/out firmware/out .pytest_cache .mypy_cache .ruff_cache

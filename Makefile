# Tessera — every target CI or a developer needs. `make check` is what CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv sysdeps benchdeps lint test check bench demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# System programs the tests and benches use (Debian packages). Installs only what is missing.
# libnbd-bin: nbdfuse, which shows disks attached to the lab's DataMover as local devices.
# util-linux (fincore) and mount (losetup): the direct-read tests check the page cache and
# read a real block device (a loop device).
SYSPKGS := e2fsprogs qemu-utils nbdkit time libnbd-bin util-linux mount
sysdeps:
	@missing=""; for p in $(SYSPKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "missing Debian packages:$$missing (run as root or install them)"; exit 1; fi; \
	fi

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# --maxfail: thirty failures mean a broken machine or tree; stop and show them (CI shows the
# tail of the output) rather than run on for an hour. tests/watchdog.py names a hung test.
test: venv sysdeps
	$(BIN)/pytest -m 'not bench and not slow' -n 2 --dist loadfile --durations=25 --maxfail=30

check: lint test

# What only the benches use: BorgBackup, measured beside Tessera on the same image.
BENCHPKGS := borgbackup
benchdeps:
	@missing=""; for p in $(BENCHPKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "missing Debian packages:$$missing (run as root or install them)"; exit 1; fi; \
	fi

bench: venv sysdeps benchdeps
	$(BIN)/python -m tests.bench

# The lab demo: fake engine + real ovirt-imageio + generated VMs (the daemon joins with the
# service issue). `python -m tests.demo_store` is the smaller tour on local disk images.
demo: venv sysdeps
	$(BIN)/python -m tests.demo_lab

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

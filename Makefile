# flower-sidecar: see README.md.  `make` builds, `make test` runs every suite,
# `make demo` runs the end-to-end demo.  Both first run `deps`.

PREFIX   ?= /usr/local
CC       ?= cc
# The package build (debian/rules) uses its own tree: BUILD=debian/build.
BUILD    ?= build
# One version, from debian/changelog's first line.
VERSION  := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog)
GEN      := $(BUILD)/gen
PYGEN    := $(BUILD)/py

# Debian packages the build, tests and demo need (chromium: the federation
# page in a headless browser, tests/integration/test_fedpage_browser.py).
DEB_PKGS := build-essential pkg-config libuv1-dev libssl-dev libnghttp2-dev \
            libprotobuf-c-dev libsystemd-dev libcurl4-openssl-dev libjansson-dev protobuf-c-compiler protobuf-compiler libgrpc-dev \
            libcmocka-dev python3 python3-grpcio python3-protobuf python3-pytest python3-pytest-xdist python3-cryptography \
            nghttp2-client openssl iproute2 nftables shellcheck clang clang-format libclang-rt-14-dev valgrind strace prometheus \
            chromium

PKGS     := libuv openssl libnghttp2 libprotobuf-c libsystemd libcurl jansson
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
GRPC_CFLAGS := $(shell pkg-config --cflags grpc 2>/dev/null)
GRPC_LIBS   := $(shell pkg-config --libs grpc gpr 2>/dev/null)

WARN     := -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter
CFLAGS   ?= -O2 -g
# CPPFLAGS and LDFLAGS as the caller gives them (dpkg-buildflags: hardening).
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE -DFS_VERSION='"$(VERSION)"' $(WARN) $(CPPFLAGS) $(CFLAGS) -Iproxy -I$(GEN) $(PKG_CFLAGS)
SAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all

PROTOS      := $(wildcard proto/*.proto)
PROTO_C     := $(patsubst proto/%.proto,$(GEN)/%.pb-c.c,$(PROTOS))
PROTO_H     := $(PROTO_C:.c=.h)
PROTO_PY    := $(patsubst proto/%.proto,$(PYGEN)/%_pb2.py,$(PROTOS))

# The daemon: every proxy/*.c except main.c is a library module that unit
# tests may link against.
PROXY_SRC   := $(filter-out proxy/main.c,$(wildcard proxy/*.c))
PROXY_OBJ   := $(patsubst proxy/%.c,$(BUILD)/obj/%.o,$(PROXY_SRC))
PROTO_OBJ   := $(patsubst $(GEN)/%.c,$(BUILD)/obj/%.o,$(PROTO_C))

# The same modules under ASan+UBSan, for unit-asan and flower-sidecar-asan:
# compiled once, not once per test.
PROXY_ASAN_OBJ := $(patsubst proxy/%.c,$(BUILD)/obj-asan/%.o,$(PROXY_SRC))
PROTO_ASAN_OBJ := $(patsubst $(GEN)/%.c,$(BUILD)/obj-asan/%.o,$(PROTO_C))

UNIT_SRC    := $(wildcard tests/unit/test_*.c)
UNIT_BIN    := $(patsubst tests/unit/%.c,$(BUILD)/unit/%,$(UNIT_SRC))
UNIT_ASAN   := $(patsubst tests/unit/%.c,$(BUILD)/unit-asan/%,$(UNIT_SRC))

.PHONY: deploy-check format format-check all binaries deps test unit unit-asan integration demo install uninstall deb deb-deps package-test clean bench bench-attacks fuzz fuzz-corpus fuzz-seeds proto-py
all: binaries proto-py
binaries: $(BUILD)/flower-sidecar $(BUILD)/flower-probe

deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "deps: installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null || exit 1; \
	else \
	  echo "deps: missing Debian packages; run:"; \
	  echo "  sudo apt-get install -y$$missing"; exit 1; \
	fi

$(GEN)/%.pb-c.c $(GEN)/%.pb-c.h: proto/%.proto
	@mkdir -p $(GEN)
	protoc-c --proto_path=proto --c_out=$(GEN) $<

$(PYGEN)/%_pb2.py: proto/%.proto
	@mkdir -p $(PYGEN)
	protoc --proto_path=proto --python_out=$(PYGEN) $<

proto-py: $(PROTO_PY)

# The federation page (GET / on the admin port) as one C string literal,
# for proxy/fedpage.c: backslashes, quotes and '?' (trigraphs) escaped.
$(GEN)/fedpage.inc: proxy/fedpage.html
	@mkdir -p $(GEN)
	sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/?/\\?/g' -e 's/^/"/' -e 's/$$/\\n"/' $< > $@.tmp && mv $@.tmp $@

$(BUILD)/obj/%.o: proxy/%.c $(wildcard proxy/*.h) $(PROTO_H) $(GEN)/fedpage.inc
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

# The version is compiled into config.o.
$(BUILD)/obj/config.o $(BUILD)/obj-asan/config.o: debian/changelog

$(BUILD)/obj/%.pb-c.o: $(GEN)/%.pb-c.c $(PROTO_H)
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(CPPFLAGS) $(CFLAGS) -I$(GEN) $(PKG_CFLAGS) -c -o $@ $<

$(BUILD)/libsidecar.a: $(PROXY_OBJ) $(PROTO_OBJ)
	rm -f $@; ar rcs $@ $^

$(BUILD)/obj-asan/%.o: proxy/%.c $(wildcard proxy/*.h) $(PROTO_H) $(GEN)/fedpage.inc
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -DFS_VERSION='"$(VERSION)"' $(WARN) $(SAN_FLAGS) -Iproxy -I$(GEN) $(PKG_CFLAGS) -c -o $@ $<

$(BUILD)/obj-asan/%.pb-c.o: $(GEN)/%.pb-c.c $(PROTO_H)
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE $(WARN) $(SAN_FLAGS) -I$(GEN) $(PKG_CFLAGS) -c -o $@ $<

$(BUILD)/libsidecar-asan.a: $(PROXY_ASAN_OBJ) $(PROTO_ASAN_OBJ)
	rm -f $@; ar rcs $@ $^

$(BUILD)/flower-sidecar: proxy/main.c $(BUILD)/libsidecar.a
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libsidecar.a $(PKG_LIBS) -lm

$(BUILD)/flower-probe: $(wildcard health/*.c health/*.h) $(PROTO_C)
	$(CC) -std=c11 -D_GNU_SOURCE $(WARN) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -I$(GEN) -Ihealth $(GRPC_CFLAGS) \
	  $(PKG_CFLAGS) -o $@ $(wildcard health/*.c) $(GEN)/health.pb-c.c $(GRPC_LIBS) $(PKG_LIBS)

# Unit tests #include the module under test (h2o style) when they need its
# static functions; they link against everything else.
$(BUILD)/unit/%: tests/unit/%.c $(BUILD)/libsidecar.a
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -Wno-unused-function -o $@ $< $(BUILD)/libsidecar.a $(PKG_LIBS) -lcmocka -lm

# As with libsidecar.a, a test that #includes a module's .c (to reach its
# statics) defines that module's symbols itself, so the archive's copy is
# never linked in.
$(BUILD)/unit-asan/%: tests/unit/%.c $(BUILD)/libsidecar-asan.a
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE $(WARN) -Wno-unused-function $(SAN_FLAGS) -Iproxy -I$(GEN) $(PKG_CFLAGS) \
	  -o $@ $< $(BUILD)/libsidecar-asan.a $(PKG_LIBS) -lcmocka -lm

$(BUILD)/flower-sidecar-asan: proxy/main.c $(BUILD)/libsidecar-asan.a
	$(CC) -std=c11 -D_GNU_SOURCE $(WARN) $(SAN_FLAGS) -Iproxy -I$(GEN) $(PKG_CFLAGS) \
	  -o $@ proxy/main.c $(BUILD)/libsidecar-asan.a $(PKG_LIBS) -lm

unit: $(UNIT_BIN)
	@set -e; for t in $(UNIT_BIN); do echo "== $$t"; $$t; done

unit-asan: $(UNIT_ASAN)
	@set -e; for t in $(UNIT_ASAN); do echo "== $$t (asan+ubsan)"; \
	  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 $$t; done

# Integration tests run PYTEST_JOBS at a time (pytest-xdist); most of their
# time is spent waiting (timeouts, outages, polling), not computing.  Tests
# that share a module fixture carry an xdist_group mark (--dist loadgroup).
# PYTEST_JOBS=0: one at a time, in this process.
PYTEST_JOBS ?= 4
integration: all $(BUILD)/flower-sidecar-asan
	/usr/bin/python3 -m pytest -q -p no:cacheprovider -n $(PYTEST_JOBS) --dist loadgroup tests/integration $(PYTEST_ARGS)

# Each stage in turn, with its time and the total at the end (tests/stages.sh).
test: deps
	@MAKE="$(MAKE)" tests/stages.sh format-check all unit unit-asan fuzz-corpus deploy-check integration

# The operator kit in deploy/: the alert rules parse and pass their
# promtool unit tests; the Grafana dashboard is JSON whose queries parse
# and name documented metrics (tests/deploy/check_dashboard.py).
deploy-check:
	promtool check rules deploy/prometheus/flower-sidecar.rules.yml
	cd deploy/prometheus && promtool test rules flower-sidecar.rules.test.yml
	/usr/bin/python3 tests/deploy/check_dashboard.py

# libFuzzer (clang) on the Fleet observer, fedstate, the gRPC message
# splitter and the event logger: tests/fuzz/fuzz_observe.c.  `make fuzz`
# explores for FUZZ_TIME seconds (new inputs go to build/fuzz-corpus);
# `make fuzz-corpus` replays the kept seeds and past crashes (in `make test`);
# `make fuzz-seeds` rebuilds the seeds from the emulator's protos.
FUZZ_CC   ?= clang
FUZZ_TIME ?= 60
FUZZ_SRC  := proxy/observe.c proxy/fedstate.c proxy/fedview.c proxy/metricrec.c proxy/fleet.c proxy/grpcmsg.c proxy/grpc.c proxy/log.c proxy/ratelimit.c $(GEN)/fleet.pb-c.c

$(BUILD)/fuzz_observe: tests/fuzz/fuzz_observe.c $(FUZZ_SRC) $(PROTO_H) $(wildcard proxy/*.h)
	$(FUZZ_CC) -std=c11 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
	  -Iproxy -I$(GEN) $(PKG_CFLAGS) -o $@ tests/fuzz/fuzz_observe.c $(FUZZ_SRC) $(PKG_LIBS) -lm

fuzz-corpus: $(BUILD)/fuzz_observe
	$(BUILD)/fuzz_observe -runs=0 tests/fuzz/corpus tests/fuzz/crashes

fuzz: $(BUILD)/fuzz_observe
	@mkdir -p $(BUILD)/fuzz-corpus
	$(BUILD)/fuzz_observe -max_total_time=$(FUZZ_TIME) -timeout=10 -rss_limit_mb=1024 \
	  -artifact_prefix=$(BUILD)/ $(BUILD)/fuzz-corpus tests/fuzz/corpus

fuzz-seeds: proto-py
	/usr/bin/python3 tests/fuzz/gen_corpus.py tests/fuzz/corpus

demo: deps
	$(MAKE) all
	/usr/bin/python3 deploy/demo.py

# Side by side with nginx and HAProxy: see bench/README.md (about 5 minutes).
bench: $(BUILD)/flower-sidecar
	bench/run

# The hostile bursts of tests/integration/test_attacks.py against the sidecar,
# nginx and HAProxy: see bench/README.md, "Attack bench" (about 3 minutes).
# Not part of `make test`.
bench-attacks: $(BUILD)/flower-sidecar
	bench/attacks

# The Prometheus alert rules: syntax, and promtool's unit tests of them.
# One C style for the whole tree (.clang-format); `make test` checks it.
FORMAT_SRC = $(wildcard proxy/*.[ch] health/*.[ch] tests/unit/*.[ch] tests/fuzz/*.[ch] bench/*.[ch])
format:
	clang-format -i $(FORMAT_SRC)

SHELL_SRC = deploy/opennebula/one-context-hook deploy/opennebula/health-check.sh deploy/opennebula/net-99-flower-sidecar
format-check:
	@clang-format --dry-run -Werror $(FORMAT_SRC) && echo "format-check: $(words $(FORMAT_SRC)) files follow .clang-format"
	@shellcheck -s sh $(SHELL_SRC) && shellcheck tests/package_test.sh tests/stages.sh && \
	  echo "format-check: shellcheck finds nothing in $(words $(SHELL_SRC)) POSIX sh scripts and 2 bash scripts"

# `make install` puts the same files as the Debian packages (DESTDIR-aware);
# the unit and the one-context shim get the installed paths.
SBINDIR   ?= $(PREFIX)/sbin
BINDIR    ?= $(PREFIX)/bin
LIBDIR    ?= $(PREFIX)/lib/flower-sidecar
MANDIR    ?= $(PREFIX)/share/man
DOCDIR    ?= $(PREFIX)/share/doc/flower-sidecar
SYSCONFDIR ?= /etc
UNITDIR   ?= $(PREFIX)/lib/systemd/system
SUBST = sed -e 's|@VERSION@|$(VERSION)|g' -e 's|/usr/sbin/flower-sidecar|$(SBINDIR)/flower-sidecar|g' \
            -e 's|/usr/lib/flower-sidecar|$(LIBDIR)|g'
INSTALLED = $(SBINDIR)/flower-sidecar $(BINDIR)/flower-probe $(MANDIR)/man8/flower-sidecar.8 \
            $(MANDIR)/man1/flower-probe.1 $(UNITDIR)/flower-sidecar@.service $(SYSCONFDIR)/default/flower-sidecar \
            $(SYSCONFDIR)/one-context.d/net-99-flower-sidecar $(LIBDIR)/one-context-hook $(LIBDIR)/health-check.sh \
            $(DOCDIR)/examples/flower-superlink.service $(DOCDIR)/examples/flower-supernode.service
install: $(BUILD)/flower-sidecar $(BUILD)/flower-probe
	install -D -m 0755 $(BUILD)/flower-sidecar $(DESTDIR)$(SBINDIR)/flower-sidecar
	install -D -m 0755 $(BUILD)/flower-probe $(DESTDIR)$(BINDIR)/flower-probe
	install -d $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(LIBDIR) \
	  $(DESTDIR)$(SYSCONFDIR)/default $(DESTDIR)$(SYSCONFDIR)/one-context.d $(DESTDIR)$(DOCDIR)/examples
	$(SUBST) deploy/man/flower-sidecar.8 > $(DESTDIR)$(MANDIR)/man8/flower-sidecar.8
	$(SUBST) deploy/man/flower-probe.1 > $(DESTDIR)$(MANDIR)/man1/flower-probe.1
	$(SUBST) deploy/systemd/flower-sidecar@.service > $(DESTDIR)$(UNITDIR)/flower-sidecar@.service
	$(SUBST) deploy/opennebula/net-99-flower-sidecar > $(DESTDIR)$(SYSCONFDIR)/one-context.d/net-99-flower-sidecar
	chmod 0644 $(DESTDIR)$(MANDIR)/man8/flower-sidecar.8 $(DESTDIR)$(MANDIR)/man1/flower-probe.1 \
	  $(DESTDIR)$(UNITDIR)/flower-sidecar@.service
	chmod 0755 $(DESTDIR)$(SYSCONFDIR)/one-context.d/net-99-flower-sidecar
	install -m 0644 deploy/systemd/flower-sidecar.default $(DESTDIR)$(SYSCONFDIR)/default/flower-sidecar
	install -m 0755 deploy/opennebula/one-context-hook deploy/opennebula/health-check.sh $(DESTDIR)$(LIBDIR)/
	install -m 0644 deploy/systemd/examples/*.service $(DESTDIR)$(DOCDIR)/examples/
uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
	-rmdir $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) 2>/dev/null
# The Debian packages, built on this machine's release (build/deb/): their
# ${shlibs:Depends} name this release's library packages.  Needs root for
# apt-get only when build dependencies are missing.
DEB_BUILD_PKGS := debhelper dpkg-dev lintian
deb-deps: deps
	@missing=""; for p in $(DEB_BUILD_PKGS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; [ -z "$$missing" ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $$missing >/dev/null)
deb: deb-deps
	rm -rf $(BUILD)/deb && mkdir -p $(BUILD)/deb
	dpkg-buildpackage -us -uc -b
	mv ../flower-sidecar_$(VERSION)_*.deb ../flower-sidecar-dbgsym_$(VERSION)_*.deb \
	  ../flower-probe_$(VERSION)_*.deb ../flower-probe-dbgsym_$(VERSION)_*.deb \
	  ../flower-sidecar_$(VERSION)_*.buildinfo ../flower-sidecar_$(VERSION)_*.changes $(BUILD)/deb/
	lintian --fail-on error $(BUILD)/deb/*.deb $(BUILD)/deb/*.changes
	@ls -l $(BUILD)/deb
# Root, on a machine you may change (CI): builds, installs with apt-get,
# checks the installed files and units, purges (tests/package_test.sh).
package-test: deb
	tests/package_test.sh $(BUILD)/deb
clean:
	rm -rf $(BUILD)

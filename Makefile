# Hermod — see README.md.
GO       ?= go
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
PREFIX   ?= /usr/local
GOTEST_FLAGS ?= -race -count=1 -timeout 20m

.PHONY: all build run test test-short bench bench-go fuzz vet fmt-check install clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/hermod ./cmd/hermod
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/hermod-bench ./cmd/hermod-bench

# The daemon on embedded defaults: SMTP on 127.0.0.1:2525, admin/metrics on
# 127.0.0.1:8025, spool in ./data/spool.
run: build
	./bin/hermod serve

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# Everything CI runs: formatting, vet, unit/fuzz-corpus/end-to-end tests
# with the race detector.
test: fmt-check vet build
	$(GO) test $(GOTEST_FLAGS) ./...

test-short:
	$(GO) test -count=1 -short ./...

# The whole loop with the bench harness (see BENCH.md): a scenario
# (default steady-1k) against the hermod just built, on its embedded
# defaults (spool on disk, fsynced before every 250). More flags with e.g.
# make bench SCENARIO=latency BENCH_FLAGS="--html bench.html --json bench.json".
bench: build
	./bin/hermod-bench run $(or $(SCENARIO),steady-1k) --hermod ./bin/hermod $(BENCH_FLAGS)

# Micro-benchmarks of the hot paths, with allocations.
bench-go:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2000x ./netio/ ./spool/ ./engine/ ./dnscache/

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzSession -fuzztime 60s ./netio/

install: build
	id hermod >/dev/null 2>&1 || useradd --system --home-dir /var/lib/hermod --shell /usr/sbin/nologin hermod
	install -D -m 0755 bin/hermod $(DESTDIR)$(PREFIX)/bin/hermod
	install -D -m 0755 bin/hermod-bench $(DESTDIR)$(PREFIX)/bin/hermod-bench
	install -D -m 0644 dist/hermod.service $(DESTDIR)/etc/systemd/system/hermod.service
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/hermod/README.md
	@if [ ! -f $(DESTDIR)/etc/hermod/hermod.toml ]; then install -D -m 0640 -g hermod dist/hermod.toml $(DESTDIR)/etc/hermod/hermod.toml; echo "installed /etc/hermod/hermod.toml: edit it"; fi
	-systemctl daemon-reload 2>/dev/null

clean:
	rm -rf bin data

# cr-proxy: `make serve` and `make test` work on a fresh Debian machine:
# each installs what is missing first (apt packages, a .venv, Python packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_RUN := nginx libnginx-mod-http-js
APT_TEST := docker-registry skopeo curl wrk docker-compose systemd docker.io podman buildah iproute2 iptables mosquitto util-linux-extra apache2-utils
PYTEST_ARGS ?=

.PHONY: serve test test-unit test-e2e lint deps deps-run deps-test bench clean soak

serve: deps-run
	$(BIN)/cr-proxy serve $(if $(CONFIG),--config $(CONFIG))

test: deps-test
	$(BIN)/ruff check cr_proxy tests bench testbed
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-unit: deps-test
	$(BIN)/pytest -q -m "not e2e" $(PYTEST_ARGS)

test-e2e: deps-test
	$(BIN)/pytest -q -m e2e $(PYTEST_ARGS)

# The chaos soak (tests/test_e2e_soak.py, docs/reliability.md "Chaos soak"):
# 1,000 pulls by 16 clients through cr-proxy while a fault injector breaks
# the upstream and serve is SIGKILLed now and then; prints the table of
# faults, resumes and outcomes. SOAK_SEED=<n> replays a run (the seed is
# printed); `make test` runs 100 pulls of it.
SOAK_PULLS ?= 1000

soak: deps-test
	SOAK_PULLS=$(SOAK_PULLS) $(BIN)/pytest -q -s tests/test_e2e_soak.py -k chaos_soak

lint: deps-test
	$(BIN)/ruff check cr_proxy tests bench testbed

deps-run: .stamp-apt-run $(VENV)/.stamp-run
deps-test: .stamp-apt-run .stamp-apt-test $(VENV)/.stamp-test

# apt: install only what is missing (dpkg -s), so repeat runs cost nothing;
# again after the lists change (a package added reaches existing checkouts).
.stamp-apt-run: Makefile
	@scripts/apt-ensure $(APT_RUN) python3 python3-venv
	@touch $@

.stamp-apt-test: Makefile
	@scripts/apt-ensure $(APT_TEST)
	@touch $@

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-run: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-run
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

clean:
	rm -rf run .stamp-apt-run .stamp-apt-test $(VENV)

# Benchmarks (bench/run.py): cr-proxy against a plain nginx, the upstream
# itself and a distribution proxy, all on 127.0.0.1; 9-14 minutes on 2
# cores (BENCH_ARGS=--quick: a smoke run). ab (apache2-utils) measures the
# HEAD rows: Debian's wrk cannot count HEAD answers that announce a body.
.PHONY: bench-doc
BENCH_ARGS ?=

bench: deps-test
	@scripts/apt-ensure apache2-utils
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-doc: deps-test
	@scripts/apt-ensure apache2-utils
	$(BIN)/python -m bench.run --write docs/benchmarks.md $(BENCH_ARGS)

# The cluster (bench/cluster.py): 48 skopeo clients pulling one image
# through three sibling nodes against through one node, each in a network
# namespace of its own (needs root); aggregate throughput and the
# upstream's GETs per blob (exactly one, cold). BENCH_CLUSTER_ARGS, e.g.
# --clients 12 --layer-mib 2 for a smoke run.
.PHONY: bench-cluster
BENCH_CLUSTER_ARGS ?=

bench-cluster: deps-test
	$(BIN)/python -m bench.cluster $(BENCH_CLUSTER_ARGS)

# Profiles of the cases where the bench misses its bar (bench/profile.py):
# perf over the whole machine and py-spy on `cr-proxy serve`, written to
# docs/profiles.md; about 2 minutes. Needs root (perf -a).
# nginx instructions per hit under valgrind, cr-proxy's configuration beside
# plain nginx (bench/instructions.py): steady on a busy machine; ~1 minute.
.PHONY: bench-instructions
bench-instructions: deps-test
	@scripts/apt-ensure apache2-utils valgrind
	$(BIN)/python -m bench.instructions

.PHONY: profile
profile: deps-test
	@scripts/apt-ensure apache2-utils linux-perf
	$(BIN)/pip install -q -e '.[profile]'
	$(BIN)/python -m bench.profile --write docs/profiles.md $(PROFILE_ARGS)

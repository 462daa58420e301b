# The Makefile is the entry point: every target installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
# CPU build of torch on these machines (a local wheel); on GPU hosts an existing CUDA torch is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
FUZZ_EXAMPLES ?= 10000
CHAOS ?= full
SOAK_SECONDS ?= 300

.PHONY: install protos run run-disagg test test-gpu test-multihost lint typecheck model bench bench-kv bench-router fuzz chaos soak trace-ui clean help

help:
	@echo "make install    create $(VENV) and install pdmesh with its dev tools"
	@echo "make protos     generate the gRPC stubs (pdmesh/v1/, pdmesh/sglang/) from protos/"
	@echo "make run        start tokenizer + worker + router + gateway on localhost (RUN_ARGS=...)"
	@echo "make run-disagg tokenizer + prefill + decode + router + gateway (PD; RUN_ARGS=...)"
	@echo "make test       install if needed, then run the test suite (GPU tests skip without a GPU)"
	@echo "make test-gpu   run only the GPU-marked tests"
	@echo "make test-multihost the mesh across network-namespace hosts with host faults (root;"
	@echo "                skipped with the reason where ip netns is not allowed); the default"
	@echo "                suite runs a short share (python -m harness.testbed: the bed alone)"
	@echo "make lint       ruff"
	@echo "make typecheck  mypy"
	@echo "make model      fetch and convert the default model into the cache dir"
	@echo "make bench      offline engine throughput vs transformers (CPU or GPU)"
	@echo "make bench-kv   KV transfer GB/s: mooncake vs grpc vs a raw socket copy"
	@echo "make bench-router pdmesh's router vs sglang-router: per-hop overhead, routing quality"
	@echo "                (OVERHEAD_ARGS=..., QUALITY_ARGS=...; installs sglang-router)"
	@echo "make trace-ui   Arize Phoenix trace UI (own venv .venv-phoenix) on :6006, OTLP :4317"
	@echo "make fuzz       fuzz the HTTP API and every gRPC service, $(FUZZ_EXAMPLES) inputs each;"
	@echo "                prints inputs and server errors per API (FUZZ_EXAMPLES=..., PDMESH_FUZZ_SEED=...)"
	@echo "make chaos      kill -9 / SIGTERM each role (and SIGSTOP a worker) under load; prints the"
	@echo "                outcome table of docs/chaos.md (CHAOS=role:kill,role:term,... for a few)"
	@echo "                CHAOS_LOAD=gpu: 256 streams on model-free stepping workers instead"
	@echo "make soak       minutes of load with cancellations and killed workers; prints RSS, fds,"
	@echo "                threads and KV pages per process and a verdict (SOAK_SECONDS=300)"

# system parts first (Debian packages; root on these machines), then the venv
$(STAMP): pyproject.toml scripts/install_consul.sh scripts/install_mooncake.sh
	scripts/install_consul.sh
	command -v prometheus >/dev/null || \
	  (apt-get update -q && apt-get install -y -q --no-install-recommends prometheus)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	PYTHON=$(PY) scripts/install_mooncake.sh
	touch $@

PROTO_SRCS := $(wildcard protos/pdmesh/v1/*.proto protos/pdmesh/sglang/*.proto)
PROTO_STAMP := pdmesh/v1/.stamp-protos

# generated stubs are not committed: they are rebuilt whenever a .proto changes
$(PROTO_STAMP): $(STAMP) $(PROTO_SRCS) scripts/gen_protos.sh
	PYTHON=$(PY) scripts/gen_protos.sh
	touch $@

install: $(STAMP) $(PROTO_STAMP)

protos: $(PROTO_STAMP)

# the whole aggregated mesh on this host; Ctrl-C stops it (python -m services.launch --help)
run: install
	$(PY) -m services.launch $(RUN_ARGS)

# the same with prefill and decode on separate workers, KV moved by Mooncake
run-disagg: install
	$(PY) -m services.launch --mode disagg $(RUN_ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the benchmark harnesses' own tests, which the default suite skips (tests/conftest.py)
test-bench: install
	PDMESH_BENCH_TESTS=1 $(PY) -m pytest -q -m bench $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

# tests/multihost on harness.testbed's three namespace hosts, the host faults included
# (PDMESH_MULTIHOST=full); -rs names the reason when they skip (not root, no ip netns)
test-multihost: install
	PDMESH_MULTIHOST=full $(PY) -m pytest -q -s -rs -o timeout=1200 tests/multihost $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check pdmesh services benchmarks harness tests
	$(PY) -m ruff format --check pdmesh services benchmarks harness tests

typecheck: install
	$(PY) -m mypy pdmesh services benchmarks harness

model: $(STAMP)
	$(PY) -m pdmesh.models.fetch

bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-kv: install
	$(PY) -m benchmarks.kv_transfer $(BENCH_ARGS)

BENCH_ROUTER_STAMP := $(VENV)/.stamp-bench-router

# the peer router is the optional extra `bench` (sglang-router from PyPI), installed on first use
$(BENCH_ROUTER_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

# pdmesh's router beside sglang-router (python -m benchmarks router-overhead --help,
# routing-quality --help): what each adds per request, then routing quality on real engines
bench-router: install $(BENCH_ROUTER_STAMP)
	$(PY) -m benchmarks router-overhead $(OVERHEAD_ARGS)
	$(PY) -m benchmarks routing-quality $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# the fuzzers of the default suite at full volume (tests/integration/test_fuzz_*.py send a few
# hundred inputs per API there) and their regression tests; -s shows each API's
# "fuzz <api>: N inputs, K server errors"
fuzz: install
	PDMESH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -o timeout=0 \
	  tests/integration/test_fuzz_http.py tests/integration/test_fuzz_grpc.py $(PYTEST_ARGS)

# the whole chaos matrix (the default suite runs two of its faults); the table also goes to
# build/chaos-report.md
chaos: install
	PDMESH_CHAOS=$(CHAOS) PDMESH_CHAOS_LOAD=$(CHAOS_LOAD) PDMESH_CHAOS_REPORT=build/chaos-report.md \
	  $(PY) -m pytest -q -s -o timeout=0 \
	  tests/chaos/test_chaos.py $(PYTEST_ARGS)

# minutes under load with faults; prints every process's series and the verdict
soak: install
	PDMESH_SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -s -o timeout=0 \
	  tests/chaos/test_soak.py $(PYTEST_ARGS)

# a local trace UI; the mesh sends to it with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317
trace-ui:
	scripts/trace_ui.sh

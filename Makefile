# The README's two commands are `make demo` and `make test`; each does all set-up.
SHELL := /bin/bash
PY    := .venv/bin/python
CODE  := strategy stream

.PHONY: setup system-deps kafka-jars lint test test-fast test-scale demo bench image image-test gpu-check gpu-check-prepare clean

setup:
	@scripts/bootstrap.sh >/dev/null

system-deps:
	@scripts/system-deps.sh

kafka-jars: system-deps
	@python3 stream/tools/local_kafka.py fetch >/dev/null

lint: setup
	.venv/bin/ruff check $(CODE) tests deploy scripts
	.venv/bin/ruff format --check $(CODE) tests deploy scripts
	scripts/mypy.sh

# Default test run: quality gates, unit tests, and integration tests against a real
# Kafka broker and a real Prometheus that the fixtures start and stop (all but `scale`).
test: setup system-deps kafka-jars lint
	$(PY) -m pytest -m "not scale" $(PYTEST_ARGS)

# Several `spacenet serve` processes sharing streams, one killed (a few minutes).
test-scale: setup system-deps kafka-jars
	$(PY) -m pytest -m scale -s $(PYTEST_ARGS)

# Unit tests only: no broker, no Prometheus, nothing marked slow.
test-fast: setup
	$(PY) -m pytest -m "not kafka and not prometheus and not slow" $(PYTEST_ARGS)

# The main job: the whole pipeline, locally (broker, producer, service).
demo: setup system-deps kafka-jars
	$(PY) -m spacenet.stream.cli demo $(DEMO_ARGS)

BENCH_ARGS ?= --benchmark split_mnist --strategies spacenet,spacenet_fb,spacenet_cal,spacenet_plus,naive,replay --seeds 0,1,2,3,4 --out results/split_mnist
bench: setup
	$(PY) -m spacenet.stream.cli bench $(BENCH_ARGS)

# The container image, with podman and no container registry (scripts/image.sh):
# `make image` builds the cpu variant, `make image VARIANT=cuda` the cuda one.
VARIANT ?= cpu
image:
	@scripts/image.sh $(VARIANT)

# The image end to end against the local Kafka broker (tests/image/); not part of `make test`.
image-test: setup system-deps kafka-jars image
	SPACENET_IMAGE=localhost/spacenet-stream:$(VARIANT) $(PY) -m pytest -m image -s $(PYTEST_ARGS) tests/image

# The GPU check (docs/gpu-check.md): CUDA tests, split MNIST on cuda and cpu, the service's
# learner on the GPU; one JSON in $(GPU_CHECK_OUT). Without CUDA it runs the CPU half.
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check: setup
	scripts/gpu-check.sh $(GPU_CHECK_OUT)

# What the check needs on the device machine, which reaches no registry: wheels and MNIST.
gpu-check-prepare: setup
	$(PY) scripts/gpu_check_prepare.py --out gpu-check-carry

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build *.egg-info

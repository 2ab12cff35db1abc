# streamscore — every developer entry point. `make run` and `make test` are the
# two commands the README opens with; both set up what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPARK_STAMP := $(VENV)/.installed-spark

.PHONY: run test test-spark lint typecheck protos protos-check check bench models k8s-config clean

# setup.py and the C source: `pip install -e` (re)builds server.explain._lookup in place
$(STAMP): pyproject.toml setup.py server/explain/_lookup.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Serve the demo models on 127.0.0.1:50051 (metrics :9464) until Ctrl-C.
run: $(STAMP)
	$(VENV)/bin/streamscore dev

## The optional extra `spark` (pyspark + pandas, ~490 MB; needs Java 17): `make test`
## installs it so the Spark engine's tests run (they skip without it). Fails if the
## install does, rather than letting those tests skip.
$(SPARK_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[spark]'
	$(PY) -c 'import pyspark, pandas'
	touch $(SPARK_STAMP)

## The whole suite, the Spark engine's tests included: generated code fresh, lint,
## types, Dockerfile lint, tests.
test: $(STAMP) $(SPARK_STAMP) protos-check lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider

## Only the Spark engine's tests (Spark == local engine; online == batch on Spark).
test-spark: $(SPARK_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/integration/test_spark_engine.py \
		tests/integration/test_training_serving_consistency.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## Regenerate protobuf/gRPC modules and stubs under protos/.
protos: $(STAMP)
	PYTHON=$(PY) bash scripts/gen_protos.sh

## Fails when the committed generated code differs from a fresh generation.
protos-check: protos
	git diff --exit-code -- protos/ || (echo "generated protos are stale: run 'make protos' and commit" >&2; exit 1)
	test -z "$$(git status --porcelain --untracked-files=all -- protos/)" || (git status --porcelain -- protos/ >&2; echo "untracked generated files under protos/" >&2; exit 1)

models: $(STAMP)
	$(VENV)/bin/streamscore models demo --repository models

bench: $(STAMP)
	$(PY) -m bench.serving_bench --json-out bench/results/serving.json

## Refresh the settings and feature files the Kubernetes ConfigMap is generated from.
k8s-config:
	cp config/streamscore.yaml deploy/k8s/base/config/streamscore.yaml
	cp features.yaml deploy/k8s/base/config/features.yaml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

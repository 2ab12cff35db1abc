#!/usr/bin/env bash
# Regenerates the Python protobuf/gRPC modules and mypy stubs beside their
# .proto sources under protos/. Proto paths mirror the Python package, so the
# generated imports need no rewriting. Run via `make protos`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
find protos -name '*_pb2*.py' -delete
find protos -name '*_pb2*.pyi' -delete
mapfile -t sources < <(find protos -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  "${sources[@]}"

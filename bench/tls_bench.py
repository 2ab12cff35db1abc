"""TLS vs plaintext throughput of the scoring port at 64 callers (issue 10's TLS figure).

Makes a throwaway CA and server certificate with ``openssl`` (EC P-256), then runs
the same ``bench.serving_bench`` scenario twice: plaintext, and ``server.tls`` with
the load generator's ``--tls-ca``. Server on core 0, client on core 1.

    python -m bench.tls_bench --duration 15 --json-out bench/results/tls.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.serving_bench import Scenario, format_table, run_scenario

_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for 127.0.0.1 / localhost."""
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    _openssl("req", "-x509", *_EC, "-keyout", ca_key, "-out", ca, "-days", "1",
             "-subj", "/CN=bench-ca")  # fmt: skip
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("req", *_EC, "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "1", "-extfile", ext)  # fmt: skip
    return ca, cert, key


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_bench", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streamscore-tls-bench-") as tmp:
        ca, cert, key = make_certificates(Path(tmp))
        tls = (f"server.tls.cert_file={cert}", f"server.tls.key_file={key}")
        c, n = args.concurrency, args.connections
        scenarios = [
            Scenario(f"plaintext c{c}", "streamscore", concurrency=c, connections=n),
            Scenario(
                f"tls c{c}",
                "streamscore",
                tls,
                concurrency=c,
                connections=n,
                loadgen_args=("--tls-ca", str(ca)),
            ),
        ]
        measurements = []
        for scenario in scenarios:
            m = run_scenario(scenario, args.repository, args.model, args.duration, args.warmup)
            measurements.append(m)
            print(format_table([m]).splitlines()[1], file=sys.stderr, flush=True)
    print(format_table(measurements))
    plain, secure = measurements
    ratio = secure.throughput_rps / plain.throughput_rps if plain.throughput_rps else 0.0
    cpu_ratio = secure.server_cpu_us_per_request / plain.server_cpu_us_per_request
    print(f"TLS / plaintext: throughput x{ratio:.2f}, server CPU per request x{cpu_ratio:.2f}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "measurements": [asdict(m) for m in measurements],
            "throughput_ratio": round(ratio, 3),
            "cpu_per_request_ratio": round(cpu_ratio, 3),
        }
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Replicas on one PostgreSQL (enrolments/s, identify latency with 1 and 3 replicas, and the
# time for a change to show on another replica). `make bench` runs the same example.
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory postgres
cargo run --release --locked --example bench_replicas -- "${1:-8}"

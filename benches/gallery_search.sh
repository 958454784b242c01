#!/usr/bin/env bash
# 1:N search benchmark: the gallery's index next to FAISS IndexFlatIP on the same
# vectors, plus start-up load time from SQLite. Not a test; numbers vary by machine.
#   bash benches/gallery_search.sh                      # 10k, 100k, 1M; load 100k, 1M
#   SIZES=10000 LOAD_SIZES=10000 bash benches/gallery_search.sh   # quick run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/bench-gallery}
SIZES=${SIZES:-10000,100000,1000000}
LOAD_SIZES=${LOAD_SIZES:-100000,1000000}
QUERIES=${QUERIES:-200}
VENV=${BENCH_VENV:-target/bench-venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import faiss, numpy" 2>/dev/null; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -r benches/requirements.txt
fi
mkdir -p "$OUT"
cargo bench --bench gallery_search -- --out "$OUT" --sizes "$SIZES" \
    --load-sizes "$LOAD_SIZES" --queries "$QUERIES"
"$VENV/bin/python" benches/faiss_search.py "$OUT"
# The vector files are large (2 GiB at 1M); the JSON report stays.
rm -f "$OUT"/vectors-*.f32 "$OUT"/queries-*.f32

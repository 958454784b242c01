"""FAISS side of the 1:N search benchmark (run by benches/gallery_search.sh).

Reads the vectors and queries that `cargo bench --bench gallery_search` wrote,
times exact FAISS IndexFlatIP search one query at a time (the service answers
one /identify at a time, and searches on one thread), checks that both return
the same top-k rows, and prints the comparison table.

usage: python benches/faiss_search.py OUT_DIR
"""
import json
import os
import sys
import time

import faiss
import numpy as np


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(out):
    with open(os.path.join(out, "mobiface.json")) as f:
        ours = json.load(f)
    # Same thread count as the service's search (one blocking thread per query).
    faiss.omp_set_num_threads(1)
    # Warm FAISS up first so its one-off allocations are not charged to the first size.
    warm = faiss.IndexFlatIP(ours["search"][0]["dim"] if ours["search"] else 512)
    warm.add(np.zeros((1, warm.d), dtype="float32"))
    warm.search(np.zeros((1, warm.d), dtype="float32"), 1)
    del warm
    rows = []
    for s in ours["search"]:
        n, dim, k = s["n"], s["dim"], s["top_k"]
        q = np.fromfile(s["query_file"], dtype="<f4").reshape(-1, dim)
        rss0 = rss_bytes()
        index = faiss.IndexFlatIP(dim)
        # Add in slices so the numpy copy never doubles the footprint being measured.
        with open(s["vectors"], "rb") as f:
            step = 65536
            for start in range(0, n, step):
                m = min(step, n - start)
                x = np.frombuffer(f.read(m * dim * 4), dtype="<f4").reshape(m, dim)
                index.add(np.ascontiguousarray(x))
                del x  # the read buffer is not part of the index
        rss_per_face = (rss_bytes() - rss0) / n
        lat = []
        agree = 0
        for i in range(q.shape[0]):
            qi = q[i : i + 1]
            t = time.perf_counter()
            _, ids = index.search(qi, k)
            lat.append((time.perf_counter() - t) * 1e3)
            agree += list(ids[0]) == s["top_rows"][i]
        lat.sort()
        med = lat[len(lat) // 2]
        p99 = lat[min(len(lat) - 1, round((len(lat) - 1) * 0.99))]
        rows.append((n, s, med, p99, rss_per_face, agree, q.shape[0]))
        del index

    if rows:
        print()
        print(f"1:N exact search, {ours['search'][0]['dim']}-d random unit vectors, top-{ours['search'][0]['top_k']}, "
              "one query at a time, one thread each (faiss.omp_set_num_threads(1))")
        print(f"{'faces':>9} | {'mobiface median':>15} {'p99':>9} {'B/face':>7} | "
              f"{'FAISS median':>12} {'p99':>9} {'B/face':>7} | {'ratio (median)':>14} | same top-k")
    for n, s, med, p99, rss, agree, nq in rows:
        print(f"{n:>9} | {s['median_ms']:>12.3f} ms {s['p99_ms']:>6.3f} ms {s['rss_bytes_per_face']:>7.0f} | "
              f"{med:>9.3f} ms {p99:>6.3f} ms {rss:>7.0f} | {s['median_ms'] / med:>13.2f}x | {agree}/{nq}")
    if ours.get("load"):
        print()
        print("gallery start-up load from SQLite (Gallery::open: migrations check + one streaming pass; page cache warm)")
        for l in ours["load"]:
            print(f"{l['n']:>9} faces: {l['load_s']:.2f} s  (file {l['file_bytes'] / 2**20:.0f} MiB)")
    bad = [r for r in rows if r[5] != r[6]]
    if bad:
        print("\nWARNING: top-k rows differ from FAISS for some queries (exactness!)")
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/bench-gallery")

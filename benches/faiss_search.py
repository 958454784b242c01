"""FAISS side of the 1:N search benchmark (run by benches/gallery_search.sh).

Reads the vectors and queries that `cargo bench --bench gallery_search` wrote,
times exact FAISS IndexFlatIP search one query at a time (FAISS scans a single
query on one thread, so it runs with one OpenMP thread) and from 8 concurrent Python
threads (FAISS releases the GIL while it searches), checks that both return the
same top-k rows, and prints the comparison table.

usage: python benches/faiss_search.py OUT_DIR
"""
import json
import os
import sys
import threading
import time

import faiss
import numpy as np


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pct(sorted_ms, p):
    return sorted_ms[min(len(sorted_ms) - 1, round((len(sorted_ms) - 1) * p))]


def main(out):
    with open(os.path.join(out, "mobiface.json")) as f:
        ours = json.load(f)
    # One OpenMP thread: FAISS scans a one-query search on a single thread whatever
    # this says, and a larger team only adds its start-up and spin-waiting
    # (measured here: 10k faces took 56 ms with 2 threads on a busy machine).
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
        med, p99 = pct(lat, 0.5), pct(lat, 0.99)
        conc = s.get("concurrent", 8)
        lat8 = []

        def caller(c):
            mine = []
            for i in range(c, q.shape[0], conc):
                t = time.perf_counter()
                index.search(q[i : i + 1], k)
                mine.append((time.perf_counter() - t) * 1e3)
            lat8.extend(mine)

        threads = [threading.Thread(target=caller, args=(c,)) for c in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lat8.sort()
        rows.append((n, s, med, p99, rss_per_face, agree, q.shape[0], pct(lat8, 0.5), pct(lat8, 0.99)))
        del index

    if rows:
        print()
        print(f"1:N exact search, {ours['search'][0]['dim']}-d random unit vectors, top-{ours['search'][0]['top_k']}; "
              f"latency of one query alone, then with {rows[0][1].get('concurrent', 8)} concurrent callers; "
              "B/face: resident memory added by the index (mobiface's f32 copy is in its spill file, not counted)")
        print(f"{'faces':>9} | {'mobiface median':>15} {'p99':>8} {'8x med':>8} {'8x p99':>8} {'B/face':>6} | "
              f"{'FAISS median':>12} {'p99':>8} {'8x med':>8} {'8x p99':>8} {'B/face':>6} | "
              f"{'FAISS/ours med':>14} {'8x med':>6} | same top-k")
    for n, s, med, p99, rss, agree, nq, med8, p99_8 in rows:
        print(f"{n:>9} | {s['median_ms']:>12.3f} ms {s['p99_ms']:>8.3f} {s['concurrent_median_ms']:>8.3f} "
              f"{s['concurrent_p99_ms']:>8.3f} {s['rss_bytes_per_face']:>6.0f} | "
              f"{med:>9.3f} ms {p99:>8.3f} {med8:>8.3f} {p99_8:>8.3f} {rss:>6.0f} | "
              f"{med / s['median_ms']:>13.2f}x {med8 / s['concurrent_median_ms']:>5.2f}x | {agree}/{nq}")
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

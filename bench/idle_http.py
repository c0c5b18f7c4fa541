"""Latency of single requests to a running server, back to back and after idle gaps.

Usage: python bench/idle_http.py PORT [TASK]   (TASK defaults to sentiment)

30 warm-up requests, then 100 sent back to back, then 30 after each gap of 10, 100 and
500 ms; prints p50 and p90 of each phase. One keep-alive connection, stdlib only. Used
for the `serve --spin-ms` table in BENCHMARKS.md ("The idle penalty"); the in-process
counterpart, without HTTP, is `cargo bench --bench idle`.
"""

import http.client
import json
import statistics
import sys
import time


def main() -> None:
    port = int(sys.argv[1])
    task = sys.argv[2] if len(sys.argv) > 2 else "sentiment"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"inputs": ["the film was a quiet delight from start to end, with fine acting"]})

    def one() -> float:
        t = time.perf_counter()
        conn.request("POST", f"/v1/tasks/{task}/classify", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}")
        return (time.perf_counter() - t) * 1e3

    for _ in range(30):
        one()
    phases = {"back to back": [one() for _ in range(100)]}
    for gap in (0.01, 0.1, 0.5):
        v = []
        for _ in range(30):
            time.sleep(gap)
            v.append(one())
        phases[f"after {gap * 1e3:.0f} ms idle"] = v
    for name, v in phases.items():
        v = sorted(v)
        print(f"{name:18} p50 {statistics.median(v):6.2f} ms  p90 {v[int(0.9 * (len(v) - 1))]:6.2f} ms")


if __name__ == "__main__":
    main()

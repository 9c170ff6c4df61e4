"""Load check of a running ``mage studio``: many generate requests at once, each retried after a 429 as the
server's Retry-After says; reports how many were answered, how many 429s were met, and the latency
(first send -> images, waits included) at p50 / p95.

    mage studio --model fashion-mnist &
    .venv/bin/python scripts/studio_load.py --url http://127.0.0.1:7860 --requests 50

Exit status 0 when every request was answered with images, 1 otherwise. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def one(url: str, body: bytes, max_tries: int, timeout: float) -> dict:
    """One request, retried on 429: {ok, seconds, retries, error}."""
    t0, retries = time.perf_counter(), 0
    for _ in range(max_tries):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                images = json.load(r).get("images") or []
            return {"ok": bool(images), "seconds": time.perf_counter() - t0, "retries": retries, "error": None}
        except urllib.error.HTTPError as e:
            if e.code != 429:
                try:
                    msg = json.load(e).get("error", "")
                except ValueError:
                    msg = ""
                return {
                    "ok": False,
                    "seconds": time.perf_counter() - t0,
                    "retries": retries,
                    "error": f"{e.code} {msg}",
                }
            retries += 1
            time.sleep(float(e.headers.get("Retry-After") or 1))
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            return {"ok": False, "seconds": time.perf_counter() - t0, "retries": retries, "error": str(reason)}
    return {"ok": False, "seconds": time.perf_counter() - t0, "retries": retries, "error": f"429 x {max_tries}"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860", help="the studio (default http://127.0.0.1:7860)")
    ap.add_argument("--requests", type=int, default=50, help="requests sent at once (default 50)")
    ap.add_argument("--num", type=int, default=4, help="images per request (default 4)")
    ap.add_argument("--steps", type=int, default=8, help="decoding steps per request (default 8)")
    ap.add_argument("--class", dest="class_label", default=None, help="class id or name (default: unconditional)")
    ap.add_argument("--max-tries", type=int, default=100, help="attempts per request, 429s included (default 100)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per attempt (default 300)")
    args = ap.parse_args(argv)
    if args.requests < 1:
        ap.error("--requests must be >= 1")
    url = args.url.rstrip("/") + "/api/generate"
    bodies = [
        json.dumps({"num": args.num, "steps": args.steps, "seed": i, "class_label": args.class_label}).encode()
        for i in range(args.requests)
    ]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.requests) as pool:
        results = list(pool.map(lambda b: one(url, b, args.max_tries, args.timeout), bodies))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat = [r["seconds"] for r in ok]
    retries, retried = sum(r["retries"] for r in results), sum(r["retries"] > 0 for r in results)
    print(f"{len(ok)}/{len(results)} answered in {wall:.1f} s ({retries} retries after 429, by {retried} requests)")
    if lat:
        print(
            f"latency p50 {percentile(lat, 50):.2f} s, p95 {percentile(lat, 95):.2f} s, max {max(lat):.2f} s, "
            f"mean {statistics.mean(lat):.2f} s; {len(ok) * args.num / wall:.1f} images/s"
        )
    errors = sorted({r["error"] for r in results if r["error"]})
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

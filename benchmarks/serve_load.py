"""A bounded load test of `edgevlm serve`: N concurrent clients (the official `openai` client) send a fixed
number of requests to a server over BUNDLE on a loopback port, in this process; prints p50/p99 latency, the
answered / refused (503) / failed counts and the process's RSS before and after, side by side.

    python benchmarks/serve_load.py --bundle BUNDLE [--clients 4] [--requests 40] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import threading
import time

import numpy as np
import openai
import uvicorn
from PIL import Image

from edgevlm.pipeline import Pipeline
from edgevlm.runner import Runner
from edgevlm.server import create_app


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def frame(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=8)
    args = ap.parse_args()

    runner = Runner(Pipeline.from_bundle(args.bundle, verify=False), max_queue=args.max_queue)
    server = uvicorn.Server(uvicorn.Config(create_app(runner, model="bench"), host="127.0.0.1", port=0,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    frames = [frame(i) for i in range(8)]

    def ask(client, n: int) -> float:
        start = time.perf_counter()
        client.chat.completions.create(model="bench", max_tokens=args.max_tokens, seed=n, messages=[{
            "role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                        {"type": "image_url", "image_url": {"url": frames[n % len(frames)]}}]}])
        return time.perf_counter() - start

    warm = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=300)
    for n in range(3):
        ask(warm, n)
    before = rss_mb()
    latencies, outcomes, lock = [], {"answered": 0, "refused (503)": 0, "failed": 0}, threading.Lock()
    counter = iter(range(args.requests))

    def client_loop():
        client = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=300)
        for n in counter:
            try:
                seconds = ask(client, n)
                with lock:
                    latencies.append(seconds)
                    outcomes["answered"] += 1
            except openai.APIStatusError as e:
                with lock:
                    outcomes["refused (503)" if e.status_code == 503 else "failed"] += 1
            except Exception:  # noqa: BLE001 - counted, the load goes on
                with lock:
                    outcomes["failed"] += 1
            if (n + 1) % 10 == 0:
                print(f"{n + 1}/{args.requests} requests ...", file=sys.stderr, flush=True)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = rss_mb()
    server.should_exit = True
    runner.close()
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    print(f"\n{args.clients} clients, {args.requests} requests, max_tokens {args.max_tokens}, {wall:.1f} s "
          f"({outcomes['answered'] / wall:.2f} answered/s)")
    print(f"latency  p50 {q[49] * 1e3:.0f} ms   p99 {q[98] * 1e3:.0f} ms")
    print("outcomes " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    print(f"RSS      {before:.1f} -> {after:.1f} MB ({100 * (after / before - 1):+.2f}%)")


if __name__ == "__main__":
    main()

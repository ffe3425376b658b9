"""Serving under load: `zhilu serve` at 1, 8 and 32 concurrent clients, as `vllm bench serve` measures it.

    python benchmarks/serve_load.py [--run runs/x] [--requests 64] [--max-tokens 64] [--bad-every 5]

Trains the default model (gpt-tiny on the standard library, 60 steps) unless ``--run`` names
a run, starts ``zhilu serve`` on a free loopback port, and at each concurrency sends
``--requests`` streamed completions (greedy, ``--max-tokens`` each) from that many client
threads with the official ``openai`` client. Every ``--bad-every``-th request of each client is also
followed by a bad one (unknown model, negative max_tokens, malformed JSON), which must get
its 4xx error while the good ones all succeed.

Metrics as `vllm bench serve` defines them: TTFT (request sent to first token), TPOT
(per request: (end-to-end latency - TTFT) / (output tokens - 1)), ITL (the gaps between
successive streamed chunks), end-to-end latency; mean, median and p99 of each;
requests/s and output tokens/s over the wall time of the level. Prints the batching gain,
output tokens/s at 32 over 1 (target: at least 8x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import Server, zhilu  # noqa: E402  (the tests' way of starting the server)

PROMPTS = ["def main(", "import os\n", "class Config:\n    ", "for i in range(", "# Copyright", "return self."]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def one(client: openai.OpenAI, prompt: str, max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    times, n_tokens = [], 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            n_tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = times[0] - start
    return {"ttft": ttft, "e2e": end - start, "tokens": n_tokens,
            "tpot": (end - start - ttft) / (n_tokens - 1) if n_tokens > 1 else 0.0,
            "itl": [b - a for a, b in zip(times, times[1:])]}  # type: ignore[dict-item]


def bad(server: Server, i: int) -> int:
    bodies = [{"model": "nope", "prompt": "x"}, {"model": "bench", "prompt": "x", "max_tokens": -1}, None]
    body = bodies[i % 3]
    data = b"{oops" if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        json.loads(e.read())["error"]["message"]  # an OpenAI error body
        return e.code


def level(server: Server, concurrency: int, requests: int, max_tokens: int, bad_every: int) -> dict[str, float]:
    client = server.client()
    results: list[dict[str, float]] = []
    bad_codes: list[int] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        for i in range(w, requests, concurrency):
            r = one(client, PROMPTS[i % len(PROMPTS)], max_tokens)
            with lock:
                results.append(r)
            if bad_every and i % bad_every == 0:
                bad_codes.append(bad(server, i))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker, w) for w in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    itl = [x for r in results for x in r["itl"]]  # type: ignore[union-attr]
    out = {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
           "out_tok_per_s": sum(r["tokens"] for r in results) / wall, "bad": len(bad_codes),
           "bad_ok": all(400 <= c < 500 for c in bad_codes)}
    for key, values in (("ttft", [r["ttft"] for r in results]), ("tpot", [r["tpot"] for r in results]),
                        ("itl", itl), ("e2e", [r["e2e"] for r in results])):
        out[key] = (statistics.mean(values), statistics.median(values), percentile(values, 99))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a trained run directory (default: train gpt-tiny 60 steps)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--bad-every", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "run"
        if args.run is None:
            result = zhilu("train", "--steps", "60", "--train.sample_tokens", "0", "--out", str(run), timeout=3600)
            if result.returncode != 0:
                print(result.stderr[-2000:], file=sys.stderr)
                return 1
        server = Server(run, "--model-name", "bench", "--max-batch", "32")
        try:
            rows = [level(server, c, max(args.requests, c), args.max_tokens, args.bad_every) for c in (1, 8, 32)]
        finally:
            server.close()
    ms = 1e3
    print(f"{'clients':>7} {'req/s':>7} {'out tok/s':>9}  {'TTFT ms mean/med/p99':>22}  {'TPOT ms':>18}  "
          f"{'ITL ms':>18}  {'E2E ms':>22}  bad requests")
    for r in rows:
        cols = "  ".join(f"{r[k][0] * ms:6.1f}/{r[k][1] * ms:6.1f}/{r[k][2] * ms:6.1f}"
                         for k in ("ttft", "tpot", "itl", "e2e"))
        print(f"{r['concurrency']:>7} {r['req_per_s']:>7.2f} {r['out_tok_per_s']:>9.1f}  {cols}  {r['bad']} "
              f"{'all 4xx' if r['bad_ok'] else 'NOT ALL 4xx'}")
    gain = rows[-1]["out_tok_per_s"] / rows[0]["out_tok_per_s"]
    print(f"batching gain (output tokens/s at 32 clients over 1): {gain:.1f}x "
          f"{'PASS' if gain >= 8 else 'FAIL'} (target 8x); every good request succeeded")
    return 0 if gain >= 8 and all(r["bad_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Load test for `treespec serve`: C concurrent streaming chat clients, each
sending R requests, on loopback. Starts the server itself (so it can read its
peak RSS) unless --url is given.

    python3 scripts/loadtest.py --spec hybrid
    python3 scripts/loadtest.py --spec none --clients 16 --requests 10

Reports wall time, generated tokens per second, TTFT p50/p99, errors by
kind, and the server's peak RSS (VmHWM). Only the standard library is used.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = [
    "Write a Python function that reverses a linked list.",
    "Explain what a hash map is in two sentences.",
    "List five fruits and their colours.",
    "Write a haiku about autumn.",
    "What is the difference between TCP and UDP?",
    "Write a JavaScript function that checks if a string is a palindrome.",
    "Give three tips for writing clean code.",
    "Summarise the plot of Romeo and Juliet.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(host, port, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("server never became healthy")


def peak_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def one_request(host, port, prompt, args):
    """Returns (ttft_s, completion_tokens, error or None)."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=args.request_timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return None, 0, f"http {resp.status}"
        ttft, tokens, done = None, 0, False
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return ttft, tokens, "stream error"
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content") and ttft is None:
                    ttft = time.perf_counter() - t0
        return ttft, tokens, None if done else "no [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as e:
        return None, 0, type(e).__name__
    finally:
        conn.close()


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="existing server as host:port (default: start one)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="hybrid", help="server --spec (none, pld, recycle, hybrid)")
    ap.add_argument("--max-concurrent", type=int, default=1)
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=10, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--time-limit", type=float, default=900, help="no new requests after this many seconds")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "treespec"))
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `treespec serve` argument (repeatable), e.g. --server-arg=--spec-max-nodes=4")
    args = ap.parse_args()

    proc = None
    if args.url:
        host, port = args.url.rsplit(":", 1)
        port = int(port)
    else:
        host, port = "127.0.0.1", free_port()
        cmd = [
            args.bin, "serve", "-m", args.model, "--port", str(port), "--spec", args.spec,
            "--max-concurrent", str(args.max_concurrent), "--queue", str(args.queue),
            *args.server_arg,
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(os.devnull, "w") if not os.environ.get("LOADTEST_LOG") else None)
    wait_healthy(host, port, proc)

    results, lock = [], threading.Lock()
    deadline = time.time() + args.time_limit

    def client(i):
        for j in range(args.requests):
            if time.time() > deadline:
                return
            r = one_request(host, port, PROMPTS[(i + j) % len(PROMPTS)], args)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    rss = peak_rss_mb(proc.pid) if proc else None
    metrics = ""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    except OSError:
        pass
    if proc:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    ok = [r for r in results if r[2] is None]
    errors = {}
    for r in results:
        if r[2] is not None:
            errors[r[2]] = errors.get(r[2], 0) + 1
    ttfts = [r[0] for r in ok if r[0] is not None]
    tokens = sum(r[1] for r in ok)
    m = {}
    for line in metrics.splitlines():
        if line and not line.startswith("#") and " " in line:
            k, v = line.rsplit(" ", 1)
            m[k] = v
    steps = float(m.get("treespec_spec_decode_num_drafts_total", 0))
    generated = float(m.get("treespec_generation_tokens_total", 0))
    drafted = float(m.get("treespec_spec_decode_num_draft_tokens_total", 0))
    accepted = float(m.get("treespec_spec_decode_num_accepted_tokens_total", 0))
    report = {
        "spec": args.spec,
        "server_args": args.server_arg,
        "max_concurrent": args.max_concurrent,
        "clients": args.clients,
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "wall_s": round(wall, 1),
        "generated_tokens": tokens,
        "throughput_tok_s": round(tokens / wall, 1) if wall > 0 else 0,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else 0,
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "draft_acceptance": round(accepted / drafted, 3) if drafted else None,
        # Tokens emitted per verify step (1.0 = no gain from drafting).
        "mean_accepted_tokens": round(generated / steps, 3) if steps else None,
        "server_peak_rss_mb": round(rss, 1) if rss else None,
    }
    print(json.dumps(report, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())

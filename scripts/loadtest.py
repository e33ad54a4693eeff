#!/usr/bin/env python3
"""Load test for `treespec serve`: C concurrent streaming chat clients, each
sending R requests, on loopback. Starts the server itself (so it can read its
peak RSS) unless --url is given.

    python3 scripts/loadtest.py --spec hybrid
    python3 scripts/loadtest.py --spec none --clients 16 --requests 10
    python3 scripts/loadtest.py --bin target/release/treespec --model qwen2.5-coder-0.5b \
        --clients 1,4,8 --requests 2 --ignore-eos --llama-server PATH/llama-server

Per point (client count, target): wall time, aggregate generated tokens per
second, TTFT and inter-token latency p50/p99, errors by kind, mean batch
size (treespec's /metrics) and the server's peak RSS (VmHWM); then a table
of every point with its throughput over the first point's. Servers are
started fresh per point with as many slots as clients. Loopback only; only
the standard library is used.
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
    """Returns (ttft_s, completion_tokens, inter-token gaps, error or None)."""
    return one_request_body(host, port, {"messages": [{"role": "user", "content": prompt}]}, args)


def one_request_body(host, port, req, args):
    req = {
        **req,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        req["ignore_eos"] = True
    body = json.dumps(req)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=args.request_timeout)
    gaps = []
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return None, 0, gaps, f"http {resp.status}"
        ttft, tokens, done, last = None, 0, False, None
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
                return ttft, tokens, gaps, "stream error"
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
        return ttft, tokens, gaps, None if done else "no [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as e:
        return None, 0, gaps, type(e).__name__
    finally:
        conn.close()


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def model_file(name):
    home = os.environ.get("TREESPEC_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "treespec")
    return os.path.join(home, "models", f"{name}.gguf")


def start_server(args, target, clients, port):
    """Starts treespec serve or llama-server with `clients` slots."""
    log = open(os.devnull, "w") if not os.environ.get("LOADTEST_LOG") else None
    if target == "treespec":
        cmd = [
            args.bin, "serve", "-m", args.model, "--port", str(port), "--spec", args.spec,
            "--max-concurrent", str(args.max_concurrent or clients), "--queue", str(args.queue),
            "-c", str(args.ctx_size), *args.server_arg,
        ]
    else:
        slots = args.max_concurrent or clients
        threads = str(os.cpu_count() or 1)
        # llama-server splits -c among its slots: give each the same context
        # as a treespec slot. Continuous batching is on by default.
        cmd = [
            args.llama_server, "--host", "127.0.0.1", "--port", str(port), "-m", model_file(args.model),
            "-t", threads, "-tb", threads, "-np", str(slots), "-c", str(args.ctx_size * slots),
            "--no-webui",
        ]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)


def run_load(host, port, proc, clients, args, target):
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
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
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

    ok = [r for r in results if r[3] is None]
    errors = {}
    for r in results:
        if r[3] is not None:
            errors[r[3]] = errors.get(r[3], 0) + 1
    ttfts = [r[0] for r in ok if r[0] is not None]
    gaps = [g for r in ok for g in r[2]]
    tokens = sum(r[1] for r in ok)
    m = {}
    for line in metrics.splitlines():
        if line and not line.startswith("#") and " " in line:
            k, v = line.rsplit(" ", 1)
            m[k] = v
    num = lambda k: float(m.get(k, 0) or 0)  # noqa: E731
    steps = num("treespec_spec_decode_num_drafts_total")
    generated = num("treespec_generation_tokens_total")
    drafted = num("treespec_spec_decode_num_draft_tokens_total")
    accepted = num("treespec_spec_decode_num_accepted_tokens_total")
    forwards = num("treespec_batch_sequences_count")
    return {
        "target": target,
        "model": args.model,
        "spec": args.spec if target == "treespec" else None,
        "server_args": args.server_arg if target == "treespec" else None,
        "slots": args.max_concurrent or clients,
        "clients": clients,
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "wall_s": round(wall, 1),
        "generated_tokens": tokens,
        "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else 0,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else 0,
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "itl_p50_s": round(percentile(gaps, 50), 4),
        "itl_p99_s": round(percentile(gaps, 99), 4),
        "draft_acceptance": round(accepted / drafted, 3) if drafted else None,
        # Tokens emitted per verify step (1.0 = no gain from drafting).
        "mean_accepted_tokens": round(generated / steps, 3) if steps else None,
        "mean_batch_sequences": round(num("treespec_batch_sequences_sum") / forwards, 2) if forwards else None,
        "mean_batch_rows": round(num("treespec_batch_rows_sum") / forwards, 1) if forwards else None,
        "server_peak_rss_mb": round(rss, 1) if rss else None,
    }


def ttft_of(host, port, messages, args):
    """TTFT of one streamed chat request with `messages` (max 8 tokens)."""
    sub = argparse.Namespace(**vars(args))
    sub.max_tokens, sub.ignore_eos = 8, True
    body = {"messages": messages}
    ttft, _, _, err = one_request_body(host, port, body, sub)
    if err:
        sys.exit(f"multi-turn request failed: {err}")
    return ttft


def multi_turn(args, target):
    """Second-turn TTFT on a ~2,000-token history: right after the first
    turn (the slot still holds it), and after an unrelated request took the
    slot (one slot: only a prefix cache can help then)."""
    history = (
        "Here is the module we discussed, for reference:\n"
        + "\n".join(f"def helper_{i}(x):\n    return x * {i} + {i % 7}  # step {i}" for i in range(110))
    )
    turn1 = [{"role": "user", "content": history + "\n\nWhat does helper_3 return for x = 2?"}]
    answer = "It returns 2 * 3 + 3 = 9."
    turn2 = turn1 + [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "And helper_10 for x = 1?"}]
    other = [{"role": "user", "content": "Write a haiku about autumn."}]
    host, port = "127.0.0.1", free_port()
    saved = args.max_concurrent
    args.max_concurrent = 1
    proc = start_server(args, target, 1, port)
    try:
        wait_healthy(host, port, proc)
        first = ttft_of(host, port, turn1, args)
        hot = ttft_of(host, port, turn2, args)
        ttft_of(host, port, other, args)
        after_other = ttft_of(host, port, turn2 + [{"role": "assistant", "content": "11."},
                                                    {"role": "user", "content": "Thanks."}], args)
    finally:
        args.max_concurrent = saved
        proc.terminate()
        proc.wait(timeout=30)
    r = {"target": target, "model": args.model, "server_args": args.server_arg if target == "treespec" else None,
         "turn1_ttft_s": round(first, 3), "turn2_ttft_s": round(hot, 3),
         "turn3_after_other_request_ttft_s": round(after_other, 3),
         "turn2_speedup": round(first / hot, 1), "turn3_speedup": round(first / after_other, 1)}
    print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
    return r


def chaos_client(host, port, prompt, args, rng, leave):
    """One streaming chat request; with `leave`, the socket is dropped after
    a random number of chunks. Returns 'done', 'left', 'rejected' (a JSON
    429/503) or a string naming what was malformed."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}],
                       "max_tokens": args.max_tokens, "stream": True, "temperature": 0.7,
                       "seed": rng.randrange(1 << 30)})
    conn = http.client.HTTPConnection(host, port, timeout=args.request_timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status in (429, 503):
            err = json.loads(resp.read())
            return "rejected" if "error" in err else "malformed rejection"
        if resp.status != 200:
            return f"http {resp.status}"
        stop_after = rng.randrange(0, 6) if leave else None
        chunks = 0
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            if line[6:] == "[DONE]":
                return "done"
            json.loads(line[6:])
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                conn.sock.close()
                return "left"
        return "no [DONE]"
    except ValueError:
        return "bad JSON chunk"
    except (OSError, http.client.HTTPException) as e:
        # A shutdown may close the connection mid-stream.
        return "closed" if args.allow_closed else type(e).__name__
    finally:
        conn.close()


def gauges(host, port):
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " in line:
            k, v = line.rsplit(" ", 1)
            m[k] = float(v)
    return m


def chaos(args):
    """64 streaming clients, half of them leaving mid-stream, then a SIGTERM
    under load: every answer well-formed, the slots and queue back to zero
    in between, a clean exit, RSS reported."""
    import random
    import signal
    rng = random.Random(7)
    host, port = "127.0.0.1", free_port()
    args.max_concurrent = args.max_concurrent or 8
    proc = start_server(args, "treespec", args.max_concurrent, port)
    wait_healthy(host, port, proc)
    outcomes, lock = {}, threading.Lock()

    def wave(n, leave_share):
        def run(i):
            r = chaos_client(host, port, PROMPTS[i % len(PROMPTS)], args, random.Random(i),
                             rng.random() < leave_share)
            with lock:
                outcomes[r] = outcomes.get(r, 0) + 1
        ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        return ts

    args.allow_closed = False
    for t in wave(64, 0.5):
        t.join()
    deadline = time.time() + 30
    while True:
        g = gauges(host, port)
        idle = g.get("treespec_num_requests_running", -1) == 0 and g.get("treespec_num_requests_waiting", -1) == 0
        if idle or time.time() > deadline:
            break
        time.sleep(0.2)
    first = dict(outcomes)
    outcomes.clear()
    args.allow_closed = True
    ts = wave(16, 0.25)
    time.sleep(1.0)
    rss = peak_rss_mb(proc.pid)
    proc.send_signal(signal.SIGTERM)
    for t in ts:
        t.join()
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "killed after 60 s"
    r = {"model": args.model, "slots": args.max_concurrent, "queue": args.queue,
         "wave1_64_clients_half_leaving": first, "idle_after_wave1": idle,
         "kv_cache_bytes_after_wave1": g.get("treespec_kv_cache_bytes"),
         "prefix_cache_bytes_after_wave1": g.get("treespec_prefix_cache_bytes"),
         "requests_total": {k.split('"')[1]: v for k, v in g.items() if k.startswith("treespec_requests_total{")},
         "wave2_16_clients_sigterm_after_1s": dict(outcomes), "exit_code": code,
         "server_peak_rss_mb": round(rss, 1) if rss else None}
    print(json.dumps(r), flush=True)
    malformed = [k for k in list(first) + list(outcomes) if k not in ("done", "left", "rejected", "closed")]
    return 0 if idle and code == 0 and not malformed else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="existing server as host:port (default: start one per point)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="hybrid", help="server --spec (none, pld, recycle, hybrid, ...)")
    ap.add_argument("--max-concurrent", type=int, default=0, help="slots (default: as many as clients)")
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--clients", default="16", help="concurrent clients; a list (1,4,8) sweeps")
    ap.add_argument("--requests", type=int, default=10, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ignore-eos", action="store_true", help="every request generates max-tokens")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ctx-size", type=int, default=2048, help="context per slot")
    ap.add_argument("--time-limit", type=float, default=900, help="no new requests after this many seconds")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "treespec"))
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `treespec serve` argument (repeatable), e.g. --server-arg=--batch-rows=32")
    ap.add_argument("--llama-server", help="also run llama-server (path, from scripts/peers/llama_cpp.sh) "
                    "at every point, same model file, prompts and slots")
    ap.add_argument("--out", help="append each point's JSON line to this file")
    ap.add_argument("--multi-turn", action="store_true",
                    help="instead of the load: second-turn TTFT on a ~2,000-token chat history")
    ap.add_argument("--chaos", action="store_true",
                    help="instead of the load: 64 clients, half leaving mid-stream, then SIGTERM under load")
    args = ap.parse_args()
    if args.chaos:
        return chaos(args)
    if args.multi_turn:
        for target in ["treespec"] + (["llama-server"] if args.llama_server else []):
            multi_turn(args, target)
        return 0
    sweep = [int(c) for c in str(args.clients).split(",") if c.strip()]
    targets = ["treespec"] + (["llama-server"] if args.llama_server else [])

    reports = []
    for clients in sweep:
        for target in targets:
            proc = None
            if args.url:
                host, port = args.url.rsplit(":", 1)
                port = int(port)
            else:
                host, port = "127.0.0.1", free_port()
                proc = start_server(args, target, clients, port)
            try:
                wait_healthy(host, port, proc)
                r = run_load(host, port, proc, clients, args, target)
            finally:
                if proc:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
            reports.append(r)
    base = {r["target"]: r["throughput_tok_s"] for r in reports if r["clients"] == sweep[0]}
    print(f"\n| target | clients | tok/s | x its {sweep[0]}-client | TTFT p50/p99 s | ITL p50/p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in reports:
        b = base.get(r["target"]) or float("nan")
        print(f"| {r['target']} | {r['clients']} | {r['throughput_tok_s']:.1f} | {r['throughput_tok_s'] / b:.2f} | "
              f"{r['ttft_p50_s']:.2f}/{r['ttft_p99_s']:.2f} | {r['itl_p50_s'] * 1e3:.0f}/{r['itl_p99_s'] * 1e3:.0f} | "
              f"{sum(r['errors'].values())} |")
    return 0 if all(not r["errors"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

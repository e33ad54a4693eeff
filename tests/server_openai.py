#!/usr/bin/env python3
"""`treespec serve` through the official `openai` Python client.

Starts the server itself on a free loopback port, runs chat and completion
requests (streamed and not) and checks the client parses everything.
Run from the crate root: `python3 tests/server_openai.py` (after
`cargo build --bin treespec` and `pip install openai`).
"""

import os
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get(
    "TREESPEC_BIN",
    os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "debug", "treespec"),
)
MODEL = os.environ.get("TREESPEC_TEST_MODEL", "smollm2-135m")
N = 24


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server():
    port = free_port()
    proc = subprocess.Popen(
        [BIN, "serve", "-m", MODEL, "--port", str(port), "-c", "1024"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server never became healthy")


def test_chat(client):
    msgs = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N, temperature=0)
    text = r.choices[0].message.content
    assert text, r
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra or {}
    assert "timings" in extra and "spec" in extra, extra.keys()

    stream = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=N,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

    # Per-request speculation off: same text (lossless).
    r2 = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=N,
        temperature=0,
        extra_body={"speculative": {"enabled": False}},
    )
    assert r2.choices[0].message.content == text


def test_completion(client):
    prompt = "def fibonacci(n):"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    text = r.choices[0].text
    assert text, r
    pieces = []
    for chunk in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=N, temperature=0, stream=True
    ):
        for c in chunk.choices:
            pieces.append(c.text or "")
    assert "".join(pieces) == text, ("".join(pieces), text)


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL], ids


def test_errors(client):
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs in (
        {"n": 2},
        {"temperature": -1},
        {"extra_body": {"speculative": {"depth": 3}}},
    ):
        try:
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, **kwargs)
        except openai.BadRequestError as e:
            assert e.status_code == 400
            assert e.body and e.body.get("message"), e.body
        else:
            raise AssertionError(f"{kwargs} was accepted")
    try:
        client.completions.create(model=MODEL, prompt="word " * 2000, max_tokens=4)
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded", e.code
    else:
        raise AssertionError("an over-long prompt was accepted")


def main():
    proc, port = start_server()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    passed = failed = 0
    try:
        for t in (test_models, test_chat, test_completion, test_errors):
            try:
                t(client)
                passed += 1
                print(f"ok   {t.__name__}")
            except Exception:
                failed += 1
                print(f"FAIL {t.__name__}")
                traceback.print_exc()
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        if code != 0:
            failed += 1
            print(f"FAIL server exit status {code} after SIGTERM")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

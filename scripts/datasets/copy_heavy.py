#!/usr/bin/env python3
"""Builds a copy-heavy benchmark set: code-edit requests over real source.

The sources are the Python files of pinned pure-Python packages fetched with
`pip download` (public registry material; nothing is committed). Each item
asks for an edit that leaves most of a function as it is, so the answer
copies the prompt: rename a variable, add type hints, add a docstring, and
two-turn conversations that edit the previous answer again (agent-style
repeated requests). Functions are chosen deterministically (sorted, then a
seeded shuffle), so the set is the same on every machine.

Usage: python3 scripts/datasets/copy_heavy.py [OUT.jsonl] [--count N]
Default OUT: $TREESPEC_HOME/datasets/copy_heavy.jsonl (~/.cache/treespec).
"""

import ast
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGES = ["requests==2.32.3", "click==8.1.7", "attrs==24.2.0"]
SEED = 20261203
# Functions long enough that copying pays, short enough that a 1.5B model
# rewrites them whole within a few hundred tokens.
MIN_LINES, MAX_LINES = 12, 40


def home() -> Path:
    return Path(os.environ.get("TREESPEC_HOME", Path.home() / ".cache" / "treespec"))


def fetch(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) < len(PACKAGES):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *PACKAGES],
            check=True,
        )
        wheels = sorted(dest.glob("*.whl"))
    return wheels


def functions(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if not name.endswith(".py"):
                continue
            src = z.read(name).decode("utf-8", "replace")
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue
            lines = src.splitlines()
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                n = node.end_lineno - node.lineno + 1
                if not MIN_LINES <= n <= MAX_LINES:
                    continue
                body = lines[node.lineno - 1 : node.end_lineno]
                indent = len(body[0]) - len(body[0].lstrip())
                text = "\n".join(l[indent:] for l in body)
                local = sorted(
                    {
                        a.id
                        for a in ast.walk(node)
                        if isinstance(a, ast.Name) and isinstance(a.ctx, ast.Store) and len(a.id) > 2
                    }
                )
                has_doc = ast.get_docstring(node) is not None
                yield f"{wheel.name.split('-')[0]}/{name}:{node.name}", text, local, has_doc


def block(code: str) -> str:
    return f"```python\n{code}\n```"


def items(funcs, count: int):
    rng = random.Random(SEED)
    rng.shuffle(funcs)
    out = []
    kinds = ["rename", "type_hints", "docstring", "multi_turn"]
    for i, (where, code, local, has_doc) in enumerate(funcs):
        kind = kinds[len(out) % len(kinds)]
        if kind == "rename" and not local:
            continue
        if kind == "docstring" and has_doc:
            continue
        reply = "Reply with the complete updated function only, in one code block."
        if kind == "rename":
            old = local[rng.randrange(len(local))]
            turns = [f"Rename the variable `{old}` to `{old}_value` in this Python function. {reply}\n\n{block(code)}"]
        elif kind == "type_hints":
            turns = [f"Add type hints to the parameters and the return value of this Python function. Change nothing else. {reply}\n\n{block(code)}"]
        elif kind == "docstring":
            turns = [f"Add a short docstring to this Python function. Change nothing else. {reply}\n\n{block(code)}"]
        else:
            turns = [
                f"Add type hints to this Python function. Change nothing else. {reply}\n\n{block(code)}",
                f"Now also add a one-line comment above the first line of the body. {reply}",
            ]
        out.append({"question_id": 9000 + len(out), "category": f"copy-{kind}", "source": where, "turns": turns})
        if len(out) == count:
            break
    return out


def main():
    args = sys.argv[1:]
    count = 24
    if "--count" in args:
        i = args.index("--count")
        count = int(args[i + 1])
        del args[i : i + 2]
    out = Path(args[0]) if args else home() / "datasets" / "copy_heavy.jsonl"
    wheels = fetch(home() / "datasets" / "copy_heavy_src")
    funcs = [f for w in wheels for f in functions(w)]
    funcs.sort(key=lambda f: f[0])
    rows = items(funcs, count)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{out}: {len(rows)} items from {len(funcs)} functions of {', '.join(PACKAGES)}")


if __name__ == "__main__":
    main()

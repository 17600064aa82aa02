"""The figures the docs quote, computed by the code they describe: memory plans and the demo model's sample.

    python scripts/docs_figures.py            # print every figure block
    python scripts/docs_figures.py --check    # exit 1 naming each block whose text the code no longer gives
    python scripts/docs_figures.py --write    # rewrite the blocks in place

A block is the text between `<!-- figures: NAME -->` and `<!-- /figures -->` in README.md or docs/*.md;
`FIGURES` makes each. tests/test_docs.py checks them, so docs and code cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)
GIB = 1024**3
# (label, preset, mesh, example hardware) of the plan table, all bfloat16, batch 1, 4096 tokens
PLANS = [
    ("8x7B", "mixtral-8x7b", "expert=4", "v5p-8 (4 chips), 4x H100"),
    ("8x7B", "mixtral-8x7b", "expert=8", "v5e-8, v6e-8, 8x H100"),
    ("8x7B", "mixtral-8x7b", "expert=8,tensor=2", "v4-32 (16 chips), v5e-16"),
    ("8x22B", "mixtral-8x22b", "expert=4", "v5p-8, 4x H200"),
    ("8x22B", "mixtral-8x22b", "expert=8", "8x H100, v5p-16"),
    ("8x22B", "mixtral-8x22b", "expert=8,tensor=2", "v4-32, v6e-16"),
    ("8x22B", "mixtral-8x22b", "expert=8,tensor=4", "v5e-32, v4-64"),
]
SAMPLE_PROMPT, SAMPLE_TOKENS = "def fibonacci(n):", 64


def plan_table() -> str:
    from mixtral_jax import plan

    rows = ["| model | mesh | devices | weights (vs total/devices) | KV cache | temporaries | total | "
            "fits 16 / 32 / 80 / 95 GiB | e.g. |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, preset, mesh, example in PLANS:
        p = plan.plan(preset, mesh, 1, 4096, "bfloat16")
        share = p.params_bytes / (p.param_count * 2 / p.devices) - 1
        fits = " / ".join("yes" if p.fits(hbm) else "no" for hbm in (16, 32, 80, 95))
        rows.append(f"| {label} | `{mesh}` | {p.devices} | {p.params_bytes / GIB:.2f} ({share:+.2%}) | "
                    f"{p.cache_bytes / GIB:.2f} | {p.temp_bytes / GIB:.2f} | {p.total_bytes / GIB:.2f} | {fits} | "
                    f"{example} |")
    return "\n".join(rows) + "\n"


def plan_long() -> str:
    from mixtral_jax import plan

    p = plan.plan("mixtral-8x7b", "expert=8", 8, 8192, "bfloat16")
    return (f"8x7B on `expert=8` with batch 8 and 8192 tokens: weights {p.params_bytes / GIB:.2f}, KV cache "
            f"{p.cache_bytes / GIB:.2f}, temporaries {p.temp_bytes / GIB:.2f}, total {p.total_bytes / GIB:.2f} "
            "GiB per device.\n")


def plan_readme() -> str:
    from mixtral_jax import plan

    p = plan.plan("mixtral-8x7b", "expert=8", 1, 4096, "bfloat16")
    return (f"(8x7B on `expert=8`, bfloat16, batch 1, 4096 tokens: {p.params_bytes / GIB:.1f} GiB of weights, "
            f"{p.total_bytes / GIB:.1f} GiB in all per device).\n")


def demo_sample() -> str:
    from mixtral_jax import demo

    model = demo.load()
    prompt = model.tokenizer.encode(SAMPLE_PROMPT)
    text = SAMPLE_PROMPT + model.tokenizer.decode(model.generate([prompt], SAMPLE_TOKENS)[0])
    return f"```python\n{text}\n```\n"


FIGURES: dict[str, Callable[[], str]] = {
    "plan-table": plan_table, "plan-long": plan_long, "plan-readme": plan_readme, "demo-sample": demo_sample,
}


def blocks() -> list[tuple[Path, str, str]]:
    """(file, name, current text) of every figure block in the docs."""
    return [(path, m["name"], m["body"]) for path in DOCS for m in BLOCK.finditer(path.read_text())]


def stale(names: list[str] | None = None) -> list[str]:
    """`file: name` of each block (of `names`, default all) whose text the code no longer gives."""
    found, wanted = [], {}
    for path, name, body in blocks():
        if names is None or name in names:
            wanted.setdefault(name, FIGURES[name]())
            if body != wanted[name]:
                found.append(f"{path.relative_to(ROOT)}: {name}")
    return found


def write() -> None:
    made: dict[str, str] = {}
    for path in DOCS:
        text = path.read_text()

        def fill(m: re.Match) -> str:
            return m[1] + made.setdefault(m["name"], FIGURES[m["name"]]()) + m[4]

        path.write_text(BLOCK.sub(fill, text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    mode.add_argument("--write", action="store_true", help="rewrite the blocks")
    args = parser.parse_args()
    if args.write:
        write()
    elif args.check:
        bad = stale()
        print("\n".join(bad) or "every figure block is current")
        sys.exit(1 if bad else 0)
    else:
        for name, make in FIGURES.items():
            print(f"{name}:\n{make()}")


if __name__ == "__main__":
    main()

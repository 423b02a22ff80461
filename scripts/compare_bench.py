"""Before/after table of two `kvsplice bench` JSON files (same workloads): engine tok/s and decode
step per row and ratio, with after/before factors. Prints Markdown.

    python scripts/compare_bench.py docs/results/bench_h200_v2lite.json docs/results/h200-2026-12-03/bench.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def engine_rows(path: Path) -> dict[tuple[str, int, int, int], dict]:
    rows = json.loads(path.read_text())["rows"]
    return {(r["system"], r["prompt_len"], r["new_tokens"], r["batch"]): r
            for r in rows if r["system"].startswith("engine@")}


def table(before: dict, after: dict) -> str:
    lines = ["| engine | prompt | batch | tok/s before | tok/s after | x | decode step ms before | after | x |"
             " prefill tok/s after |", "|" + "---|" * 10]
    for key in sorted(set(before) & set(after), key=lambda k: (k[0], k[1], k[3])):
        b, a = before[key], after[key]
        step_b, step_a = b["extra"]["decode_step_ms"], a["extra"]["decode_step_ms"]
        prefill = a["extra"].get("prefill_tok_s")
        lines.append(f"| {key[0]} | {key[1]} | {key[3]} | {b['output_tok_s']:,.0f} | {a['output_tok_s']:,.0f} | "
                     f"{a['output_tok_s'] / b['output_tok_s']:.2f} | {step_b:.2f} | {step_a:.2f} | "
                     f"{step_b / step_a:.2f} | {f'{prefill:,.0f}' if prefill else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    print(table(engine_rows(args.before), engine_rows(args.after)))


if __name__ == "__main__":
    main()

"""Turn pytest-benchmark JSON into the Markdown tables of bench/README.md.

Usage: python bench/report.py bench/results/latest.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def report(path: str | Path) -> str:
    data = json.loads(Path(path).read_text())
    lines = [
        f"Machine: {data.get('machine_info', {}).get('cpu', {}).get('brand_raw', '?')}, {data.get('datetime', '?')}",
        "",
    ]
    groups: dict[str, list[dict]] = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or b["fullname"].split("::")[0], []).append(b)
    for group, benches in groups.items():
        extra_keys: list[str] = []
        for b in benches:
            for k in b.get("extra_info", {}):
                if k not in extra_keys:
                    extra_keys.append(k)
        lines.append(f"### {group}")
        lines.append("")
        lines.append("| benchmark | median (s) | min (s) | rounds | " + " | ".join(extra_keys) + " |")
        lines.append("|---" * (4 + len(extra_keys)) + "|")
        for b in benches:
            st = b["stats"]
            extra = [_fmt(b.get("extra_info", {}).get(k, "")) for k in extra_keys]
            lines.append(
                f"| {b['name']} | {st['median']:.4g} | {st['min']:.4g} | {st['rounds']} | " + " | ".join(extra) + " |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json"))

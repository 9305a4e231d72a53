"""The closing report of `matrix dedup`, from its manifest."""

from __future__ import annotations

from typing import Any


def lines(manifest: dict[str, Any]) -> list[str]:
    d = manifest["dedup"]
    out = [
        f"matrix dedup: {manifest['input']} -> {manifest['output']}",
        f"  rows in {manifest['rows_in']:,}: kept {d['rows_kept']:,}, removed {d['rows_removed']:,} "
        f"(exact {d['removed_exact']:,}, near {d['removed_near']:,}), "
        f"bad input {manifest['rows_error']:,}, skipped {manifest['rows_skipped']:,}",
        f"  clusters {d['clusters']:,} (largest {d['largest_cluster']:,} rows), "
        f"groups of identical text {d['exact_groups']:,}",
        f"  units {manifest['units']:,} ({manifest['units_resumed']:,} resumed), {manifest['wall_seconds']:.1f} s",
    ]
    out += [f"  {count:,} x {reason}" for reason, count in manifest["error_reasons"].items()]
    return out


def print_report(manifest: dict[str, Any]) -> None:
    print("\n".join(lines(manifest)), flush=True)

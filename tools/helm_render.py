# /// script
# requires-python = ">=3.10"
# dependencies = ["helm-python-sdk==0.2.2"]
# ///
"""Render a Helm chart like `helm template`, with the real Helm v4 Go SDK (no helm binary, no cluster).

    uv run tools/helm_render.py chart [-f values.yaml ...] [--set k=v ...] [--set-string k=v ...]
        [--set-json k=JSON ...] [--name RELEASE] [--namespace NS] [--output FILE] [--lint]

Helm comes from the PyPI wheel `helm-python-sdk` (ctypes bindings to libhelm_c, which embeds helm.sh/helm/v4).
Values are merged like the helm CLI: values files in order (deep merge), then --set/--set-string/--set-json in
order. The chart's values.schema.json is enforced. Prints the manifests as one YAML stream; on failure prints
helm's message to stderr and exits 1. With --lint, runs `helm lint --strict` with those values instead: prints
each finding and exits 1 on any warning or error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` into `base` like helm's values merge: maps merge, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Ordered(argparse.Action):
    """Collects --set, --set-string and --set-json in command-line order (later wins, as in helm)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.sets.append((self.dest, values))


def user_values(files: list[str], sets: list[tuple[str, str]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in files:
        values = deep_merge(values, helm.values_from_yaml(Path(path).read_text()) or {})
    parsers = {
        "set": helm.parse_set_string,
        "set_string": helm.parse_set_string_values,
        "set_json": helm.parse_set_json,
    }
    for kind, expression in sets:
        values = deep_merge(values, parsers[kind](expression))
    return values


def render(chart_dir: str, values: dict[str, Any], name: str, namespace: str) -> str:
    """The manifest stream of `helm template` (values checked against values.schema.json), by template path."""
    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path in sorted(manifests):
        text = manifests[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        docs.append(f"---\n# Source: {path}\n{text}\n")
    return "".join(docs)


LINT_SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def lint(chart_dir: str, values: dict[str, Any], namespace: str) -> int:
    report = helm.lint(chart_dir, values, strict=True, namespace=namespace)
    worst = 0
    for message in report["messages"]:
        severity = int(message["severity"])
        worst = max(worst, severity)
        print(f"[{LINT_SEVERITY.get(severity, severity)}] {message['path']}: {message['error'].strip()}")
    return 1 if worst >= 2 else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chart", nargs="?", help="chart directory or .tgz")
    parser.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    parser.add_argument("--set", dest="set", action=_Ordered, help="KEY=VALUE, helm --set syntax")
    parser.add_argument("--set-string", dest="set_string", action=_Ordered, help="KEY=VALUE, value kept a string")
    parser.add_argument("--set-json", dest="set_json", action=_Ordered, help="KEY=JSON")
    parser.add_argument("--name", default="matrix", help="release name (default: matrix)")
    parser.add_argument("--namespace", default="default", help="release namespace (default: default)")
    parser.add_argument("--output", "-o", help="write the YAML here instead of stdout")
    parser.add_argument("--lint", action="store_true", help="run helm lint --strict instead of rendering")
    parser.add_argument("--version", action="store_true", help="print the embedded Helm SDK version and exit")
    parser.set_defaults(sets=[])
    args = parser.parse_args(argv)
    if args.version:
        print(f"helm {helm.helm_sdk_version()} (libhelm_c {helm.helm_c_version()})")
        return 0
    if not args.chart:
        parser.error("the chart directory is required")
    try:
        if args.lint:
            return lint(args.chart, user_values(args.values, args.sets), args.namespace)
        stream = render(args.chart, user_values(args.values, args.sets), args.name, args.namespace)
    except helm.HelmError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(stream)
    else:
        sys.stdout.write(stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `matrix` command.

    matrix run SPEC --input URI --output URI [--partitions N] [--concurrency N] [--overwrite] [KEY=VALUE ...]
    matrix serve SPEC [KEY=VALUE ...]     deploy the spec's LLM backend on the cluster, print endpoints
    matrix status                         Serve applications on the cluster and their health

Exit codes: 0 done, 2 bad spec/input/output/backend (nothing started), 1 the run failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from matrix_provider.protocol import ERROR_PREFIX, MANIFEST_PREFIX

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matrix", description="Peer-to-peer multi-agent LLM pipelines on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline over an input into an output")
    run.add_argument("spec", help="YAML path or shipped pipeline name")
    run.add_argument("--input", required=True, help="file, folder or glob; local path or s3://")
    run.add_argument("--output", required=True, help="output folder; local path or s3://")
    run.add_argument("--partitions", type=int, default=1, help="data-parallel partition drivers")
    run.add_argument("--concurrency", type=int, default=64, help="rows in flight per partition")
    run.add_argument("--overwrite", action="store_true", help="replace an output written by another config")
    run.add_argument("--quiet", action="store_true", help="no progress or summary")
    run.add_argument("--manifest-json", action="store_true", help="print the manifest as one JSON line")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides, e.g. llm=sim")
    serve = sub.add_parser("serve", help="deploy a spec's LLM backend and print its endpoints")
    serve.add_argument("spec")
    serve.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    sub.add_parser("status", help="Serve applications on the cluster and their health")
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)
    return code


def _compose(args: argparse.Namespace, run: dict[str, Any]) -> Any:
    from matrix_provider.runtime.spec import compose

    return compose(args.spec, args.overrides, run)


def cmd_run(args: argparse.Namespace) -> int:
    from matrix_provider.runtime import job

    run = {
        "input": args.input,
        "output": args.output,
        "partitions": args.partitions,
        "concurrency": args.concurrency,
        "overwrite": args.overwrite,
    }
    try:
        spec = _compose(args, run)
        manifest = job.run(spec, quiet=args.quiet)
    except job.USAGE_ERRORS as exc:
        return _fail(str(exc))
    except job.RunFailed as exc:
        return _fail(str(exc), 1)
    if args.manifest_json:
        print(MANIFEST_PREFIX + json.dumps({k: v for k, v in manifest.items() if k != "spec"}), flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from matrix_provider.llm import backends
    from matrix_provider.runtime import job

    try:
        spec = _compose(args, {"input": "-", "output": "-"})
        job.connect_ray()
        config = backends.deploy(spec.llm)
        backends.probe(config)
    except job.USAGE_ERRORS as exc:
        return _fail(str(exc))
    for endpoint in config.endpoints:
        print(f"{spec.llm.backend}\t{config.model}\t{endpoint}\thealthy")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    from ray import serve

    from matrix_provider.runtime import job

    job.connect_ray()
    status = serve.status()
    for name, app in status.applications.items():
        print(f"{name}\t{app.status}\t{app.message or ''}".rstrip())
        for dep_name, dep in app.deployments.items():
            replicas = ", ".join(f"{k}={v}" for k, v in dep.replica_states.items())
            print(f"  {dep_name}\t{dep.status}\t{replicas}")
    if not status.applications:
        print("no Serve applications running")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    handler = {"run": cmd_run, "serve": cmd_serve, "status": cmd_status}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())

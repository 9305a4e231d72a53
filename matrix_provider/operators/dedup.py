"""MatrixDedupOperator: `matrix dedup` as a Ray job, with everything else MatrixPipelineOperator's.

Submission under a deterministic id, re-attach on retry, deferral to MatrixRayJobTrigger, the
manifest as XCom value, Asset events, links and kill come from MatrixPipelineOperator; this class
only says which command the job runs. Like the rest of the Airflow side it never imports the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from matrix_provider.operators.outcome import AirflowException
from matrix_provider.operators.pipeline import MatrixPipelineOperator, job_entrypoint, require_text, whole_numbers

_COUNTS = (
    ("partitions", "--partitions"),
    ("cpus", "--cpus"),
    ("n_grams", "--n-grams"),
    ("num_buckets", "--buckets"),
    ("hashes_per_bucket", "--hashes-per-bucket"),
)


class MatrixDedupOperator(MatrixPipelineOperator):
    """Remove exact and near-duplicate documents (MinHash LSH on Ray Data) of `input_uri` into `output_uri`.

    :param input_uri: a committed matrix output, or a JSONL/Parquet file, folder or glob. Templated.
    :param output_uri: output folder for the kept rows; rerunning on it resumes. Templated.
    :param partitions: hash partitions of every shuffle (default: the cluster's CPUs). Templated.
    :param cpus: CPUs of the cluster the job may use at once (default: all).
    :param text_field: the field holding the document. Templated.
    :param id_field: the field holding its id (rows without one are named by their position). Templated.
    :param exact: remove copies whose normalized text is identical.
    :param near: remove near-duplicates (MinHash with LSH bands).
    :param n_grams: words per shingle; ``num_buckets``: LSH bands; ``hashes_per_bucket``: hashes per
        band; ``seed``: of the MinHash permutations. None keeps datatrove's ``MinhashConfig`` default.

    Every other argument is MatrixPipelineOperator's (connection, cluster, deferrable, retries …).
    """

    template_fields: Sequence[str] = (
        "input_uri",
        "output_uri",
        "ray_conn_id",
        "cluster",
        "partitions",
        "text_field",
        "id_field",
    )

    def __init__(
        self,
        *,
        input_uri: str,
        output_uri: str,
        partitions: int | str | None = None,
        cpus: int | None = None,
        text_field: str = "text",
        id_field: str = "id",
        exact: bool = True,
        near: bool = True,
        n_grams: int | None = None,
        num_buckets: int | None = None,
        hashes_per_bucket: int | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pipeline="dedup", input_uri=input_uri, output_uri=output_uri, partitions=partitions, **kwargs)
        self.cpus = cpus
        self.text_field = text_field
        self.id_field = id_field
        self.exact = exact
        self.near = near
        self.n_grams = n_grams
        self.num_buckets = num_buckets
        self.hashes_per_bucket = hashes_per_bucket
        self.seed = seed

    def _check_arguments(self) -> None:
        require_text(self, ("input_uri", "output_uri", "ray_conn_id", "text_field", "id_field"))
        whole_numbers(self, [name for name, _ in _COUNTS])
        if not (self.exact or self.near):
            raise AirflowException("exact and near are both False: the job would have nothing to do")

    def entrypoint(self) -> str:
        args = [self.matrix_command, "dedup", "--input", self.input_uri, "--output", self.output_uri]
        args += ["--text-field", self.text_field, "--id-field", self.id_field, "--manifest-json"]
        args += [flag for flag, off in (("--no-exact", not self.exact), ("--no-near", not self.near)) if off]
        for name, flag in (*_COUNTS, ("seed", "--seed")):
            if getattr(self, name) is not None:
                args += [flag, str(getattr(self, name))]
        if self.overwrite:
            args.append("--overwrite")
        return job_entrypoint(args)

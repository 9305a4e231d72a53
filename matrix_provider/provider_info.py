"""Provider registration (entry point `apache_airflow_provider`)."""

from __future__ import annotations

from typing import Any

from matrix_provider import __version__


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "matrix-provider",
        "name": "Matrix (peer-to-peer multi-agent LLM pipelines on Ray)",
        "description": "Run matrix pipelines as Ray jobs: deferrable operator, Ray Jobs hook and trigger, UI view.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": "Matrix on Ray", "external-doc-url": "https://docs.ray.io/", "tags": ["software"]}
        ],
        "operators": [
            {
                "integration-name": "Matrix on Ray",
                "python-modules": [
                    "matrix_provider.operators.dedup",
                    "matrix_provider.operators.pipeline",
                    "matrix_provider.operators.slurm_cluster",
                    "matrix_provider.operators.stop",
                ],
            }
        ],
        "sensors": [{"integration-name": "Matrix on Ray", "python-modules": ["matrix_provider.sensors.ray_job"]}],
        "hooks": [{"integration-name": "Matrix on Ray", "python-modules": ["matrix_provider.hooks.ray_jobs"]}],
        "triggers": [{"integration-name": "Matrix on Ray", "python-modules": ["matrix_provider.triggers.ray_job"]}],
        "extra-links": ["matrix_provider.links.ray.RayJobLink", "matrix_provider.links.ray.GrafanaLink"],
        "plugins": [{"name": "matrix", "plugin-class": "matrix_provider.plugins.ui.MatrixPlugin"}],
        "config": {
            "matrix": {
                "description": "Settings of the Matrix provider.",
                "options": {
                    "deployment": {
                        "description": "This Airflow deployment's name, in every Ray job id and job metadata it "
                        "makes. Set it (e.g. staging, prod) when two deployments share a Ray cluster: without it "
                        "equal DAG and run ids name the same job, and each would stop or re-attach to the "
                        "other's.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "prod",
                        "default": "",
                    }
                },
            }
        },
        "connection-types": [
            {
                "hook-class-name": "matrix_provider.hooks.ray_jobs.MatrixRayHook",
                "hook-name": "Matrix on Ray (Jobs API)",
                "connection-type": "matrix_ray",
                "conn-fields": {
                    "tls": {"label": "Use HTTPS", "schema": {"type": ["boolean", "null"], "default": False}},
                    "verify_tls": {
                        "label": "Verify TLS certificate",
                        "schema": {"type": ["boolean", "null"], "default": True},
                    },
                    "ca_bundle": {
                        "label": "CA bundle (PEM path)",
                        "schema": {"type": ["string", "null"]},
                        "description": "The CA that signed the dashboard's certificate, on every worker and triggerer",
                    },
                    "dashboard_url": {
                        "label": "Ray dashboard URL for links",
                        "schema": {"type": ["string", "null"]},
                        "description": "Public URL of the dashboard, if it differs from host:port",
                    },
                    "grafana_url": {"label": "Grafana URL", "schema": {"type": ["string", "null"]}},
                    "retry_s": {
                        "label": "Retry window per call (s)",
                        "schema": {"type": ["number", "null"], "default": 30},
                        "description": "How long one Jobs API call rides out a dashboard outage or HTTP 5xx",
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "extra"],
                    "relabeling": {
                        "host": "Ray dashboard host",
                        "port": "Ray dashboard port (8265)",
                        "password": "Ray auth token",
                    },
                    "placeholders": {"host": "ray-head.example.internal", "port": "8265"},
                },
            }
        ],
    }

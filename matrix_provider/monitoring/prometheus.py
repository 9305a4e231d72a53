"""`matrix monitor`: a Prometheus config for a running cluster, and Prometheus started on it.

Targets come from Ray's own service-discovery file (`prom_metrics_service_discovery.json` in the
head's session directory, rewritten by Ray as nodes join and leave), so workers that a scheduler
adds, requeues or loses are followed without a restart. Run it where that file is readable: on
the head node, or anywhere with a path to it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from matrix_provider.clusters.cluster import ClusterInfo
from matrix_provider.clusters.errors import ClusterError

SD_FILE = "prom_metrics_service_discovery.json"


def discovery_file(info: ClusterInfo) -> Path:
    if not info.temp_dir:
        raise ClusterError(f"cluster {info.name!r} has no head address yet: is it up? (`matrix cluster status`)")
    return Path(info.temp_dir) / "session_latest" / SD_FILE


def write_config(info: ClusterInfo, scrape_interval_s: float) -> Path:
    """prometheus.yml in the state directory: Ray's targets, labelled with the cluster's name."""
    interval = f"{scrape_interval_s:g}s"
    job = {
        "job_name": "ray",
        "file_sd_configs": [{"files": [str(discovery_file(info))]}],
        "relabel_configs": [{"target_label": "cluster", "replacement": info.name}],
    }
    config = Path(info.state_dir) / "prometheus.yml"
    timing = {"scrape_interval": interval, "evaluation_interval": interval}
    config.write_text(yaml.safe_dump({"global": timing, "scrape_configs": [job]}))
    return config


def run_prometheus(state_dir: Path, port: int, binary: str, config_only: bool, scrape_interval_s: float = 5) -> int:
    """Write the config; unless `config_only`, become Prometheus on 127.0.0.1:`port` (exec: a signal
    to `matrix monitor` reaches Prometheus itself, and no orphan is left)."""
    info = ClusterInfo.load(state_dir)
    config = write_config(info, scrape_interval_s)
    print(f"wrote {config}", flush=True)
    if config_only:
        return 0
    # The TSDB stays on this host (Prometheus does not support NFS, where a state dir often is), one
    # per cluster (never mixed with an earlier cluster of the same name).
    args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={info.temp_dir}-prometheus",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    found = shutil.which(binary)
    if not found:
        raise ClusterError(f"Prometheus binary {binary!r} not found: install it or pass --prometheus")
    os.execv(found, args)

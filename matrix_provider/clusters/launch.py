"""The scripts that start a Ray cluster's nodes, for SLURM batch jobs and for `--local`.

The head script picks free ports on its node, writes the cluster's addresses to `head.json` in
the state directory (which SLURM users keep on a shared filesystem) and runs `ray start --head
--block`; a worker script waits for `head.json` and joins. Both run Ray in the foreground, so the
scheduler that owns the script (slurmd, or our own process group with `--local`) owns every Ray
process, and cancelling the job ends them. Token auth is always on; the token is read from a
0600 file in the state directory, never from the command line.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

# Free ports are chosen on the node that binds them, by the node's own Python. The node's address is
# the one Ray itself would pick (not gethostbyname(hostname), which is 127.0.1.1 on stock Debian).
# Any Ray token or address inherited from the submitter is dropped: the cluster's own token file rules.
_PRELUDE = """\
set -euo pipefail
unset RAY_AUTH_TOKEN RAY_ADDRESS
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} RAY_USAGE_STATS_ENABLED=0
free_port() {{ {python} -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }}
node_ip=$({python} -c 'from ray._private.services import get_node_ip_address as ip; print(ip())')
job="{tag}-${{SLURM_JOB_ID:-local$$}}${{SLURM_ARRAY_TASK_ID:+-$SLURM_ARRAY_TASK_ID}}"
cpus="${{SLURM_CPUS_ON_NODE:-{cpus}}}"
"""

_HEAD = """\
gcs=$(free_port); dash=$(free_port); metrics=$(free_port); agent=$(free_port); client=$(free_port)
{python} - "$node_ip" "$gcs" "$dash" "$metrics" "$job" {state}/head.json <<'PY'
import json, os, sys
ip, gcs, dash, metrics, job, path = sys.argv[1:]
head = {{"gcs_address": f"{{ip}}:{{gcs}}", "dashboard_url": f"http://{{ip}}:{{dash}}", "node_ip": ip, "job": job}}
with open(path + ".tmp", "w") as out:
    json.dump({{**head, "metrics_export_port": int(metrics)}}, out)
os.replace(path + ".tmp", path)
PY
exec {ray} start --head --block --node-ip-address="$node_ip" --port="$gcs" \\
  --dashboard-host="$node_ip" --dashboard-port="$dash" --metrics-export-port="$metrics" \\
  --dashboard-agent-listen-port="$agent" --ray-client-server-port="$client" --num-cpus="$cpus" \\
  --num-gpus={gpus} --temp-dir="{temp_root}$job" --disable-usage-stats
"""

# A worker joins only this cluster's head: a head.json left by another cluster of the same name (or
# one being replaced) carries another tag.
_WORKER = """\
head_of_this_cluster() {{
  {python} -c 'import json, sys; h = json.load(open(sys.argv[1])); assert h["job"].startswith(sys.argv[2])
print(h["gcs_address"])' {state}/head.json "{tag}-" 2>/dev/null
}}
for _ in $(seq 600); do gcs=$(head_of_this_cluster) && break; sleep 1; done
[[ -n "${{gcs:-}}" ]] || {{ echo "no head of cluster {tag} in {state}/head.json after 600 s" >&2; exit 1; }}
metrics=$(free_port); agent=$(free_port)
exec {ray} start --block --address="$gcs" --node-ip-address="$node_ip" --metrics-export-port="$metrics" \\
  --dashboard-agent-listen-port="$agent" --num-cpus="$cpus" --num-gpus={gpus} \\
  --temp-dir="{temp_root}$job" --disable-usage-stats
"""


# A node's Ray temp dir is TEMP_ROOT + its job (`<tag>-<scheduler's job id>`): short, because Ray's
# socket paths under it must fit AF_UNIX's 107 bytes.
TEMP_ROOT = "/tmp/mx-"


def temp_dir(job: str) -> str:
    return TEMP_ROOT + job


@dataclass(frozen=True)
class NodeCommand:
    """What every node of a cluster runs: the `ray` to start and the node's size."""

    ray: str
    python: str
    state_dir: str
    token_file: str
    cpus: int
    gpus: int
    tag: str  # this cluster's, in its nodes' Ray temp dirs: job ids repeat across SLURM instances

    def _fill(self, body: str) -> str:
        values = {
            "ray": shlex.quote(self.ray),
            "python": shlex.quote(self.python),
            "state": shlex.quote(self.state_dir),
            "token": shlex.quote(self.token_file),
            "cpus": self.cpus,
            "gpus": self.gpus,
            "tag": self.tag,
            "temp_root": TEMP_ROOT,
        }
        return _PRELUDE.format(**values) + body.format(**values)

    def head(self) -> str:
        return self._fill(_HEAD)

    def worker(self) -> str:
        return self._fill(_WORKER)

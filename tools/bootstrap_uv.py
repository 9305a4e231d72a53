"""Put a pinned uv at a path, with nothing but the system's Python 3 (stdlib only).

`make` needs uv before any environment exists. `pip install --user uv` is refused by Debian 12 and
Ubuntu 24.04 (PEP 668, externally managed), and their Python may have neither pip nor venv. So this
reads PyPI's JSON simple index (PEP 691), takes the uv wheel for this machine, checks its sha256
against the index and unpacks the one `uv` binary from it.

    python3 tools/bootstrap_uv.py 0.13.8 .tools/bin/uv
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import stat
import sys
import urllib.request
import zipfile
from pathlib import Path

INDEX = os.environ.get("UV_BOOTSTRAP_INDEX", "https://pypi.org/simple")


def wheel_tags() -> tuple[str, ...]:
    """Platform tags a uv wheel for this machine carries, best first."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if sys.platform != "linux":
        raise SystemExit(f"bootstrap_uv: install uv yourself on {sys.platform} (https://docs.astral.sh/uv/)")
    libc = "musllinux" if platform.libc_ver()[0] != "glibc" else "manylinux"
    return (f"{libc}_1_1_{arch}", f"{libc}_2_17_{arch}", f"{libc}_2_28_{arch}", f"{libc}_2_31_{arch}")


def pick(files: list[dict], version: str) -> dict:
    wheels = [f for f in files if f["filename"].startswith(f"uv-{version}-") and f["filename"].endswith(".whl")]
    for tag in wheel_tags():
        for wheel in wheels:
            if tag in wheel["filename"]:
                return wheel
    raise SystemExit(f"bootstrap_uv: no uv {version} wheel for {platform.machine()} on {INDEX}")


def fetch(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return answer.read()


def main(version: str, target: str) -> None:
    index = json.loads(fetch(f"{INDEX}/uv/", "application/vnd.pypi.simple.v1+json"))
    wheel = pick(index["files"], version)
    data = fetch(wheel["url"])
    digest = hashlib.sha256(data).hexdigest()
    if digest != wheel["hashes"]["sha256"]:
        raise SystemExit(f"bootstrap_uv: {wheel['filename']} has sha256 {digest}, the index says {wheel['hashes']}")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        binary = archive.read(f"uv-{version}.data/scripts/uv")
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(out)
    print(f"uv {version} -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])

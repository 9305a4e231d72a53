#!/usr/bin/env bash
# Debian packages some tests need (headless Chromium for the UI check, PostgreSQL for Airflow's
# services, SLURM and munge for the cluster tests, Prometheus for the metrics test, bubblewrap for
# the tool sandbox, the PostgreSQL documentation's HTML pages for WARC input). Installs only what is missing.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v bwrap >/dev/null || missing+=(bubblewrap)
# Real HTML pages for the WARC input tests (tests/warc_corpus.py).
[[ -d /usr/share/doc/postgresql-doc-15/html ]] || missing+=(postgresql-doc-15)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then echo "need root to apt-get install ${missing[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

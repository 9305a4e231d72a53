"""Prometheus for a running cluster (`matrix monitor`) and the Grafana dashboards we ship."""

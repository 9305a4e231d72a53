"""Shipped pipelines: one Python module (roles + routing + columns) and one YAML spec each."""

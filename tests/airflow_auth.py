"""The auth manager of the whole-system tests: Airflow's SimpleAuthManager plus one per-DAG rule.

SimpleAuthManager grants by role on every DAG; the managers teams run in production (FAB,
Keycloak) grant per DAG. This one denies user `outsider` (a viewer) the DAG `matrix_curation`,
through `is_authorized_dag`, which the core API's checks and `get_authorized_dag_ids` both call, so the
Matrix view's per-DAG checks are exercised by Airflow's own auth machinery.
"""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

DENIED = {"outsider": frozenset({"matrix_curation"})}


class PerDagAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        if details is not None and details.id in DENIED.get(user.get_name(), frozenset()):
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)

"""matrix-provider: peer-to-peer multi-agent LLM pipelines on Ray, driven from Airflow.

`runtime/` and `llm/` run inside Ray and never import Airflow; `hooks/`, `operators/`,
`triggers/`, `links/` and `plugins/` are the Airflow side and talk to Ray over the Jobs REST API.
"""

__version__ = "0.1.0"

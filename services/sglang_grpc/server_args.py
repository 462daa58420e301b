"""The ``GetServerInfo.server_args`` entries pdmesh writes (servicer) and reads (router client).

SGLang's ``ServerArgs`` names, so a client that knows SGLang engines reads pdmesh workers the
same way and pdmesh's router reads SGLang engines: ``disaggregation_mode`` ("null", "prefill" or
"decode") and ``disaggregation_bootstrap_port`` say a worker's PD role and where its bootstrap
server listens. Torch-free: the router imports it.
"""

from __future__ import annotations

DISAGGREGATION_MODE = "disaggregation_mode"
BOOTSTRAP_PORT = "disaggregation_bootstrap_port"
PAGE_SIZE = "page_size"
# pdmesh's own addition: the worker's --migration-limit, for pdmesh's router
MIGRATION_LIMIT = "pdmesh_migration_limit"

# pdmesh roles → SGLang's --disaggregation-mode values
DISAGGREGATION_MODES = {"aggregated": "null", "prefill": "prefill", "decode": "decode"}
ROLES = {mode: role for role, mode in DISAGGREGATION_MODES.items()}

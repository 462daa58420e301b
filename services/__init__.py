"""The pdmesh services, each runnable as ``python -m services.<name>``.

- ``tokenizer``  tokenize, chat templates, incremental detokenization, stop strings
- ``router``     the gRPC front door: picks workers, streams text back, manages the worker set
- ``decode``     the worker (runs the engine; aggregated or the decode side of PD)
- ``prefill``    the prefill side of PD
- ``gateway``    OpenAI-compatible HTTP in front of the router

Each is ``config.py`` (a frozen dataclass, one field per flag), ``server.py`` (thin servicers
over ``pdmesh`` library code) and ``__main__.py``; shared gRPC plumbing is ``pdmesh.rpc``.
"""

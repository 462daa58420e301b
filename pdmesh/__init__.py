"""pdmesh: LLM serving as a mesh of gRPC services with prefill/decode disaggregation.

The shared library used by every service in ``services/``:

- ``pdmesh.engine``      paged-KV inference engine (sequence, block manager, scheduler, runner, sampler)
- ``pdmesh.models``      model configs, the Llama-family forward, weight loading and the default model fetch
- ``pdmesh.kv_transfer`` moving KV pages between processes (Mooncake, gRPC)
- ``pdmesh.discovery``   finding services (static lists, Consul)
- ``pdmesh.telemetry``   tracing and metrics

The benchmarks (``benchmarks/``), the test harnesses (``harness/``) and the one-host launcher
(``services.launch``) live outside it: nothing here imports them.
"""

__version__ = "0.1.0"

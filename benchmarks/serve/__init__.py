"""Online load generator for a running pdmesh mesh (``python -m benchmarks.serve``).

Like SGLang's ``bench_serving``: it sends a dataset of prompts to the OpenAI-compatible gateway
(HTTP, streamed SSE) or straight to the router (gRPC ``RouterService.Generate``), at a Poisson
request rate or a fixed concurrency, and reports TTFT, ITL, TPOT, end-to-end latency,
throughput and goodput under SLOs.

Modules: ``config`` (the flags), ``datasets`` (random, shared-prefix, ShareGPT prompts),
``tokenizer`` (token ids <-> text for building prompts), ``sse`` (the event-stream parser),
``timing`` (per-request bookkeeping), ``backends`` (OpenAI HTTP and gRPC clients), ``runner``
(arrivals, concurrency, the progress bar), ``metrics`` (the summary) and ``report`` (table and
JSON).
"""

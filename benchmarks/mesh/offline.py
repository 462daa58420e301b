"""``--offline-reference``: what the real worker's engine decodes per second offline, at each
concurrency as its batch, with ``benchmarks``'s own runner: the ideal the real worker's arms
are compared with (the stepping worker's is concurrency / step_ms by construction)."""

from __future__ import annotations

import gc
import logging

from benchmarks.config import BenchConfig
from benchmarks.mesh.config import MeshBenchConfig
from benchmarks.offline import PdmeshRunner
from benchmarks.workload import random_prompts
from pdmesh.models import loader

log = logging.getLogger(__name__)


def offline_decode_tok_s(cfg: MeshBenchConfig) -> dict[int, float]:
    """Decode tok/s (greedy, EOS ignored, prefill excluded) by batch = each concurrency level;
    one untimed run per batch first. The engine's default dtype for the device."""
    levels = cfg.levels()
    bench = BenchConfig(
        model=cfg.model,
        device=cfg.device,
        prompt_len=cfg.prompt_len,
        decode_tokens=max(cfg.output_len, 2),
        decode_batches=",".join(map(str, levels)),
        skip_reference=True,
        seed=cfg.seed,
    )
    source = loader.resolve(cfg.model)
    runner = PdmeshRunner(bench, bench.dtype_names()[0], source)
    out = {}
    for batch in levels:
        prompts = random_prompts(batch, cfg.prompt_len, source.config.vocab_size, cfg.seed + batch)
        runner.run(prompts, bench.decode_tokens)  # warmup (CUDA graphs, allocator)
        out[batch] = runner.run(prompts, bench.decode_tokens).decode_tok_s
        log.info("offline decode at batch %d: %.0f tok/s", batch, out[batch])
    del runner
    gc.collect()
    return out

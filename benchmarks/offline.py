"""The pdmesh side: an ``LLMEngine`` sized so a whole batch prefills in one step."""

from __future__ import annotations

import itertools

from benchmarks.config import BenchConfig
from benchmarks.workload import Clock, Timing
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.models import loader
from pdmesh.models.llama import LlamaForCausalLM


def engine_config(cfg: BenchConfig, dtype: str) -> EngineConfig:
    """Enough pages and token budget that no run waits, chunks its prefill or preempts."""
    batch = cfg.max_batch()
    context = cfg.prompt_len + cfg.decode_tokens + 1
    pages_per_seq = -(-context // cfg.page_size)
    return EngineConfig(
        model=cfg.model,
        device=str(cfg.torch_device()),
        dtype=dtype,
        page_size=cfg.page_size,
        num_pages=batch * pages_per_seq + 1,
        max_running_requests=batch,
        max_num_batched_tokens=batch * cfg.prompt_len,
        # repeats reuse the same prompts: a prefix cache would skip their prefill
        enable_prefix_cache=False,
        seed=cfg.seed,
    )


class PdmeshRunner:
    def __init__(self, cfg: BenchConfig, dtype: str, source: loader.ModelSource) -> None:
        self.engine = LLMEngine(engine_config(cfg, dtype), source)
        self.clock = Clock(self.engine.device)
        self._ids = itertools.count()

    @property
    def model(self) -> LlamaForCausalLM:
        return self.engine.runner.model

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        """Greedy, exactly ``new_tokens`` per row (EOS ignored), all rows submitted at once."""
        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        ids = [f"bench-{next(self._ids)}" for _ in prompts]
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        waiting_first = len(ids)
        first = None
        t0 = self.clock.now()
        for rid, prompt in zip(ids, prompts, strict=True):
            self.engine.add_request(rid, prompt, params)
        while self.engine.has_work:
            for out in self.engine.step():
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                row = tokens[out.request_id]
                waiting_first -= bool(out.new_token_ids and not row)
                row.extend(out.new_token_ids)
            if first is None and waiting_first == 0:
                first = self.clock.now()
        end = self.clock.now()
        assert first is not None, "the engine finished without producing tokens"
        return Timing(
            batch=len(prompts),
            prompt_len=len(prompts[0]),
            new_tokens=new_tokens,
            first_s=first - t0,
            total_s=end - t0,
            tokens=[tokens[rid] for rid in ids],
        )

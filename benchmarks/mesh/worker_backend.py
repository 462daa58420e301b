"""``WorkerBackend``: ``benchmarks.serve``'s gRPC backend pointed at a worker instead of the
router: ``pdmesh.v1.WorkerService.Generate``, one server stream per request, token ids in and
out. The mesh benchmark's baseline arm: what the worker alone delivers, before any hop."""

from __future__ import annotations

import grpc

from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.grpc_backend import FAILED_REASONS, GrpcBackend, finished
from benchmarks.serve.timing import RequestResult, StreamClock
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc


class WorkerBackend(GrpcBackend):
    """``--grpc-target`` names the worker; prompts must be token ids (a worker never
    tokenizes). Sampling and ``--extra-request-body`` as in ``GrpcBackend``."""

    _worker: worker_pb2_grpc.WorkerServiceStub | None = None

    @property
    def target(self) -> str:
        return f"grpc://{self.address} (pdmesh.v1.WorkerService/Generate)"

    async def start(self) -> None:
        self._worker = worker_pb2_grpc.WorkerServiceStub(await self._connect("worker"))

    def worker_request(self, req: BenchRequest, request_id: str) -> worker_pb2.GenerateRequest:
        prompt = req.full_prompt()
        if not isinstance(prompt, list):
            raise TypeError("a worker takes token ids: build the requests with as_ids")
        return worker_pb2.GenerateRequest(
            request_id=request_id, token_ids=prompt, sampling_params=self.sampling(req)
        )

    async def _stream(
        self, req: BenchRequest, request_id: str, clock: StreamClock, result: RequestResult
    ) -> RequestResult:
        if self._worker is None:
            raise RuntimeError("WorkerBackend.start() was not awaited")
        call = self._worker.Generate(self.worker_request(req, request_id), timeout=self.timeout)
        usage: common_pb2.Usage | None = None
        finish = common_pb2.FINISH_REASON_UNSPECIFIED
        try:
            async for msg in call:
                clock.arrived(len(msg.token_ids))
                if msg.HasField("usage"):
                    usage = msg.usage
                if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    finish = msg.finish_reason
                    clock.stop()
                if msg.finish_reason in FAILED_REASONS:
                    reason = common_pb2.FinishReason.Name(msg.finish_reason)
                    return clock.fail(result, f"{reason}: {msg.error or 'no message'}")
        except grpc.aio.AioRpcError as e:
            return clock.fail(result, f"{e.code().name}: {e.details()}")
        if finish == common_pb2.FINISH_REASON_UNSPECIFIED:
            return clock.fail(result, "the stream ended without a finish_reason")
        return finished(result, clock, finish, usage)

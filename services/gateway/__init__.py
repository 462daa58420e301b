"""The HTTP gateway (``python -m services.gateway``): OpenAI-compatible ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/models``, SGLang-native ``/generate``, and ``/health``, in front of
the router's gRPC ``Generate`` stream."""

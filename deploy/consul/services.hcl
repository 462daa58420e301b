# Consul service definitions for the stack's third-party parts, so the Consul catalog shows the
# whole system. pdmesh roles are not listed: each registers itself on start, with a native gRPC
# health check, and deregisters on graceful shutdown.
services {
  name = "jaeger"
  id   = "jaeger"
  address = "jaeger"
  port = 16686
  tags = ["tracing", "ui"]
  meta = {
    otlp_grpc_port = "4317"
    otlp_http_port = "4318"
  }
  check {
    name     = "jaeger UI"
    http     = "http://jaeger:16686/"
    interval = "10s"
    timeout  = "2s"
  }
}

services {
  name = "prometheus"
  id   = "prometheus"
  address = "prometheus"
  port = 9090
  tags = ["metrics"]
  check {
    name     = "prometheus ready"
    http     = "http://prometheus:9090/-/ready"
    interval = "10s"
    timeout  = "2s"
  }
}

services {
  name = "pdmesh-sd"
  id   = "pdmesh-sd"
  address = "pdmesh-sd"
  port = 9099
  tags = ["prometheus-http-sd"]
  check {
    name     = "pdmesh http_sd"
    http     = "http://pdmesh-sd:9099/health"
    interval = "10s"
    timeout  = "2s"
  }
}

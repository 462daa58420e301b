"""OpenTelemetry tracing and Prometheus metrics — arrives with the observability issue."""

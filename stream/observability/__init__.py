"""Observability of the service: its Prometheus metrics, the scrape-time model-state
collector, the telemetry that ties them to one process, and the HTTP endpoints."""

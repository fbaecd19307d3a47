"""OpenTelemetry for Arbiter: tracing (MCP semantic conventions), structured logs and metrics."""

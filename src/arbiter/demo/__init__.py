"""Demo upstream MCP servers (support knowledge base, CRM) and the one-command demo runner."""

"""The web console at ``/console``: pages for security teams and auditors (docs/console.md)."""

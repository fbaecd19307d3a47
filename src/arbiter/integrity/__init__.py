"""Tool-definition integrity: pinning support, the poisoning scan, shadowing detection and guards.

The scan (``scan.scan_definition``, rules in ``poisoning_rules.toml``) and shadowing detection
(``shadowing.find_shadowing``) are pure functions over MCP definitions; the registry decides what a
finding means (a flagged definition is never auto-approved) and stores the findings. Nothing is
re-exported here so importing one module does not load the others' data.
"""

"""Authentication: principals, JWT/JWKS verification, API keys, outbound credentials."""

"""Authorization: Casbin policies behind ``PolicyEngine``. The only package that imports casbin."""

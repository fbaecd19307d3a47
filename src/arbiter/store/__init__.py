"""Database engine, sessions and the SQLModel tables shared by proxy and admin."""

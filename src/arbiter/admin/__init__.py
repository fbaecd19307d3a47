"""The admin API (``/admin/v1``): FastAPI routers, schemas and dependencies."""

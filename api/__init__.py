"""The taskray REST API (FastAPI): ``create_app(settings)``."""

from api.app import create_app
from api.settings import Settings

__all__ = ["Settings", "create_app"]

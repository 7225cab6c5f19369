"""shadowproxy: a shadow-mode reverse proxy for ML model endpoints."""

__version__ = "0.1.0"

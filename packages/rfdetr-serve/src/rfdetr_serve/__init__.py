"""rfdetr-serve: an HTTP API (FastAPI + uvicorn) over RF-DETR-Seg models; see :mod:`rfdetr_serve.app`."""

__version__ = "0.2.0"

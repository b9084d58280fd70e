"""The Accelerate-driven training and validation engine of rfdetr-train."""

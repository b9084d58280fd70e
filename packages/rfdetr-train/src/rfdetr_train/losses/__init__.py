"""Losses and Hungarian matching of rfdetr-train."""

"""Datasets, augmentation and the dataset checker of rfdetr-train."""

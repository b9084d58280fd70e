"""COCO box/mask evaluation, per-class tables and reports of rfdetr-train."""

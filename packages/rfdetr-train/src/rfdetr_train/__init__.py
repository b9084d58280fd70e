"""rfdetr-train."""

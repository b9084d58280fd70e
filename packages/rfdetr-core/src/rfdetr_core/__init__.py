"""rfdetr-core."""

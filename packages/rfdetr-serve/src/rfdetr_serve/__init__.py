"""rfdetr-serve."""

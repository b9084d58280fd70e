"""rfdetr-export."""

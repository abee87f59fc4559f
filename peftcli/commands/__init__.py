"""Each CLI command as a plain function that reads top to bottom."""

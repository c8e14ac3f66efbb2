"""Data: sources, the synthetic safety world, and the training recipes."""

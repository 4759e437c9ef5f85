"""The terminal adapter: the `medtune` command, its typed HTTP client and the demo."""

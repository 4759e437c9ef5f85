"""What the service persists: the database, its tables and the stores built on them."""

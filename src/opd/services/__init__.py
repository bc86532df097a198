"""Remote services: the one JSON-over-HTTP client every network call goes through (``http``)."""

"""The error types adapters raise for bad input: each becomes a 4xx JSON answer."""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class MediaError(ApiError):
    """An image could not be fetched or decoded; ``status`` is the 4xx code to answer with."""

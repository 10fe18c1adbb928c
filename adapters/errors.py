"""The one error type adapters raise for bad input: it becomes a 4xx JSON answer."""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

"""What goes wrong asking the Kubernetes API server, without importing its client (the
API's error handling needs the class; only a cluster-reviewing API needs the client)."""

from __future__ import annotations


class ReviewUnavailable(Exception):
    """The API server could not answer a review; the message says why and what to do."""

    def __init__(self, message: str, retry_after: int = 2):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

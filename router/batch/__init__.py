"""OpenAI-compatible Batch API on the router: offline work co-located with online traffic.

Files and batches live on disk (``store``) so that a router restart, even after
kill -9, loses no job: the ``runner`` resumes every unfinished batch and skips
the lines whose results were already written. Lines run through the router's
own front door at offline class, so they take the offline path of whatever
routing and scheduling policy is active.
"""

from router.batch.runner import BatchRunner, http_sender
from router.batch.store import BatchStore

__all__ = ["BatchRunner", "BatchStore", "http_sender"]

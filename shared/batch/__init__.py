"""Batch embedding: documents read from a file or an object, embedded in batches, written beside it.

The same pipeline serves the `batch_embed` Lambda function (S3 -> SQS -> Lambda) and `fnserve batch-embed`.
"""

"""Fault injection for the chaos tests: an S3 proxy that breaks requests on purpose (`s3_proxy`)."""

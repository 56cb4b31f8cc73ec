"""Developer tooling: sample models, an embedded S3, and the local API (no Docker, no AWS)."""

"""The HTTP/REST transport (docs/http_api.md): KServe v2 REST with Triton's binary extension, the typed API as
JSON, raw images and multipart uploads, and the page at /."""

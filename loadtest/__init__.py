"""kvsplice-loadtest: drive a kvsplice (or any OpenAI-compatible) server over HTTP and report.

Speaks only HTTP: it imports nothing from `server` or `kvsplice`, so it measures what a client
sees and can be pointed at any build, or at another engine with the same API.
"""

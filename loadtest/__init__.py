"""Load tests for shadowproxy: a fast fake V2 backend and the mirror-overhead benchmark."""

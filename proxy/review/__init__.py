"""The admin plane: the review page and its API, sign-in, the golden set, TLS, and the review
process that serves the heavy reads."""

"""The live path: the listeners, forwarding to the reference (or the canary's candidate), and the
pooled upstream connections. Nothing here waits on the shadow side."""

"""The demo: traffic and defaults for `shadowproxy demo`."""

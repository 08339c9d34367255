"""One adapter per wire protocol: its routes or methods, what must never be mirrored, how its
requests and answers decode into the comparable form, and how the review page shows them."""

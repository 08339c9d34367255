"""Model builds as revisions: what each upstream serves, fingerprinted (``fingerprint``), kept as
a ledger in Redis (``ledger``), found for every comparison (``tracker``), and compared
(``compare``)."""

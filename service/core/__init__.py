"""The protocol-neutral core: sessions, batching and the data plane. Imports no transport code."""

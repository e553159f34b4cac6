"""RTP ingest: `packet`, `jitter`, `receiver`, `admission` and `ports` are sans-IO; `ingest`
(UDP sockets) and `sender` (`callscribe send`) do the I/O."""

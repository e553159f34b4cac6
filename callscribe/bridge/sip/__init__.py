"""SIP user agent server and SIPREC recording server: `message` (wire format), `uas`
(transactions and dialogs), `events`, `auth`, `sdp`, `siprec` and `session` are sans-IO;
`server` is the asyncio transport."""

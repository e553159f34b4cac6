"""Asterisk AudioSocket: `parser` is sans-IO, `server` the asyncio TCP listener."""

"""The browser tests run a real bridge against the real Redis: the integration fixtures
(including the session check that Redis answers) apply here too."""

from tests.integration.conftest import _redis_is_up, key_prefix, make_service, redis

__all__ = ["_redis_is_up", "key_prefix", "make_service", "redis"]

"""Media forks: PBXs and CPaaS platforms that stream call audio to callscribe over websockets.

One sans-IO parser per dialect (all `ForkParser`s, keyed here by the name of their URL path
`/fork/<name>`) and one endpoint (`ForkSession`) that drives any of them.
"""

from __future__ import annotations

from callscribe.bridge.forks.asterisk import AsteriskWebsocketParser
from callscribe.bridge.forks.base import ForkParser
from callscribe.bridge.forks.exotel import ExotelParser
from callscribe.bridge.forks.freeswitch import FreeswitchParser
from callscribe.bridge.forks.plivo import PlivoParser
from callscribe.bridge.forks.telnyx import TelnyxParser
from callscribe.bridge.forks.twilio import TwilioParser

DIALECTS: dict[str, type[ForkParser]] = {
    parser.dialect: parser
    for parser in (
        AsteriskWebsocketParser,
        FreeswitchParser,
        TwilioParser,
        TelnyxParser,
        PlivoParser,
        ExotelParser,
    )
}

__all__ = ["DIALECTS", "ForkParser"]

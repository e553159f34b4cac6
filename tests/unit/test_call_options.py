"""Per-call options reach the engine: every ingest's metadata shapes give the leg its
vocabulary (leg options over call options), with no server."""

from __future__ import annotations

from callscribe.calls import CallRegistry
from callscribe.engine.base import Vocabulary
from callscribe.events import TranscriptEvent
from callscribe.metrics import Metrics
from tests.scripted_engine import TimedScriptEngine


class Sink:
    def __init__(self) -> None:
        self.events: list[TranscriptEvent] = []

    def publish(self, event: TranscriptEvent) -> None:
        self.events.append(event)


def test_vocabulary_from_each_ingest_shape() -> None:
    engine = TimedScriptEngine(["x"])
    registry = CallRegistry(engine, Sink(), Metrics())
    registry.open_leg("api", "caller", {"context": "Acme", "keyterms": ["Zelle"]})
    registry.open_leg("twilio", "inbound", {"custom": {"context": "Acme", "keyterms": "Zelle, IBAN"}})
    registry.open_leg("fs", "caller", {"metadata": {"keyterms": ["Priya"]}})
    registry.open_leg("sip", "caller", {"sip": {"x-callscribe-context": "billing queue"}})
    registry.open_leg("sip", "agent", {"sip": {}, "keyterms": "refund"})  # the call's context, its own terms
    registry.open_leg("none", "caller", {"label": "x"})
    assert engine.vocabularies == {
        ("api", "caller"): Vocabulary("Acme", ("Zelle",)),
        ("twilio", "inbound"): Vocabulary("Acme", ("Zelle", "IBAN")),
        ("fs", "caller"): Vocabulary("", ("Priya",)),
        ("sip", "caller"): Vocabulary("billing queue", ()),
        ("sip", "agent"): Vocabulary("billing queue", ("refund",)),
        ("none", "caller"): Vocabulary(),
    }

"""Qwen3-ASR prompts and outputs: the text around the audio, and the text that comes back.

The prompt follows the official Qwen3-ASR SDK (and vLLM's `qwen3_asr.get_generation_prompt`):
an optional system turn carrying the context, a user turn holding the audio placeholder, and
the assistant turn, which ends in `language {Language}<asr_text>` when the language is forced.
The model answers `language {Language}<asr_text>{text}` (or only `{text}` when forced); a
streaming decode continues after a prefix appended to the assistant turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ASR_TEXT_TAG = "<asr_text>"
AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
AUDIO_TOKEN = "<|audio_pad|>"
# Anything shaped like a ChatML control token: context text must not open or close turns.
_CHATML_LIKE = re.compile(r"<\|[^|]+\|>")
_LANGUAGE_PREFIX = "language "

# The languages Qwen3-ASR names in its output, by ISO 639-1 code, so `language="en"` works too.
LANGUAGES = {
    "zh": "Chinese",
    "en": "English",
    "yue": "Cantonese",
    "ar": "Arabic",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "pt": "Portuguese",
    "id": "Indonesian",
    "it": "Italian",
    "ko": "Korean",
    "ru": "Russian",
    "th": "Thai",
    "vi": "Vietnamese",
    "ja": "Japanese",
    "tr": "Turkish",
    "hi": "Hindi",
    "ms": "Malay",
    "nl": "Dutch",
    "sv": "Swedish",
    "da": "Danish",
    "fi": "Finnish",
    "pl": "Polish",
    "cs": "Czech",
    "fil": "Filipino",
    "fa": "Persian",
    "el": "Greek",
    "hu": "Hungarian",
    "mk": "Macedonian",
    "ro": "Romanian",
}


def language_name(language: str | None) -> str | None:
    """'en' or 'english' → 'English'; None or blank → None (the model detects the language)."""
    if language is None or not language.strip():
        return None
    value = language.strip()
    if value.lower() in LANGUAGES:
        return LANGUAGES[value.lower()]
    if not value.replace(" ", "").isalpha() or len(value) > 40:
        raise ValueError(f"language {language!r} must be an ISO 639-1 code or a language name like 'English'")
    return value[:1].upper() + value[1:].lower()


def sanitise_context(text: str) -> str:
    """Remove ChatML-like tokens and `<asr_text>` until none is left: removing one occurrence
    can join its neighbours into a new one (`<|im<|x|>_end|>`), so one pass is not enough."""
    previous = None
    while previous != text:
        previous = text
        text = _CHATML_LIKE.sub("", text).replace(ASR_TEXT_TAG, "")
    return text.strip()


def build_prompt(context: str = "", language: str | None = None, prefix: str = "") -> str:
    """The full prompt text for one decode; `prefix` is raw model output to continue from
    (it may start with the `language X<asr_text>` header the model wrote itself)."""
    clean = sanitise_context(context)
    system = f"<|im_start|>system\n{clean}<|im_end|>\n" if clean else ""
    forced = f"{_LANGUAGE_PREFIX}{language}{ASR_TEXT_TAG}" if language else ""
    return (
        f"{system}<|im_start|>user\n{AUDIO_PLACEHOLDER}<|im_end|>\n"
        f"<|im_start|>assistant\n{forced}{sanitise_prefix(prefix)}"
    )


def sanitise_prefix(prefix: str) -> str:
    """A rollback prefix is model output, so it may hold `<asr_text>` (the header) but never a turn token."""
    previous = None
    while previous != prefix:
        previous = prefix
        prefix = _CHATML_LIKE.sub("", prefix)
    return prefix


@dataclass(frozen=True, slots=True)
class AsrOutput:
    language: str
    text: str


def parse_output(raw: str, forced_language: str | None = None) -> AsrOutput:
    """`language English<asr_text>hello` → (English, hello). With a forced language the whole
    output is text. `language None` is how the model says it heard no speech."""
    text = raw.strip()
    if forced_language:
        return AsrOutput(forced_language, text.split(ASR_TEXT_TAG)[-1].strip())
    if ASR_TEXT_TAG not in text:
        return AsrOutput("", text)  # as the seed: no header means the output is all text
    header, _, body = text.partition(ASR_TEXT_TAG)
    language = ""
    for line in header.splitlines():
        line = line.strip()
        if line.lower().startswith(_LANGUAGE_PREFIX):
            language = line[len(_LANGUAGE_PREFIX) :].strip()
    if language.lower() == "none":
        language = ""
    return AsrOutput(language, body.replace(ASR_TEXT_TAG, "").strip())

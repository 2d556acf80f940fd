"""What a generation request may ask for, independent of the model: the prompt's text and the shortest clip.

The CLI and the OSC daemon both refuse with these messages (the daemon sends them in `/soundctm/fail`); the
model-dependent limits (steps, ω range, clip length) are `Engine.check_params`, which uses MIN_DURATION too.
"""

from __future__ import annotations

import unicodedata

MAX_PROMPT_CHARS = 512  # far beyond what a text encoder reads (tens of tokens); keeps one OSC datagram small
MIN_DURATION = 0.01  # seconds (441 samples at 44.1 kHz): anything shorter is a click, not a sound


def clean_prompt(prompt: str) -> str:
    """The prompt without surrounding whitespace. Raises ValueError with the reason when it cannot be one:
    empty, longer than MAX_PROMPT_CHARS, with control characters (newline, tab, escape, ...), or not text."""
    if not isinstance(prompt, str):
        raise ValueError("prompt must be text")
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt too long ({len(prompt)} > {MAX_PROMPT_CHARS} characters)")
    if any(unicodedata.category(ch) == "Cc" for ch in prompt):
        raise ValueError("prompt contains control characters (e.g. a newline or a tab): write it on one line")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a command line that was not UTF-8
        raise ValueError("prompt is not valid text (not encodable as UTF-8)") from None
    return prompt

"""The browser demo's logic (what ``app.py`` imports): the session and its model sets, the examples,
medical uploads, rendering, figures, benchmark.
Reaches the model only through ``freqmedclip.inference``; may also use ``evaluation`` and ``data``."""

"""The papers' operating points measured side by side with timm's models and with ToMe, for
BENCHMARKS.md (`python -m benchmarks`). Not part of the installed package: it imports vitslim,
vitslim never imports it."""

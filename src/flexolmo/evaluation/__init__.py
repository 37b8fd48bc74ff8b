"""Measuring models: bits per byte and routing statistics, downstream tasks through lm-eval, the extraction audit."""

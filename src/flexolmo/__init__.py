"""flexolmo: FlexOlmo (Shi et al., 2025) for organisations that cannot share their data.

A coordinator publishes a dense public anchor; each data owner trains an expert on its own data next to the
anchor's frozen feed-forward layers; the coordinator merges any set of experts into one mixture of experts
that transformers and vLLM load; any owner can opt out later without retraining.
"""

__version__ = "0.1.0"

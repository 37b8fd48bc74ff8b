"""The coordinator's side: merge, add and remove experts, admission checks, router tuning, anchor import and
pretraining, and verifying what it publishes."""

"""The one training loop, its resumable run state, its distributed strategies (replicated, FSDP2) and the memory
plan."""

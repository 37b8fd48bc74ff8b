"""The models: anchor families, the mixture-of-experts block, router initialisation, the merged checkpoint's format, and
the runtime that loads any of them."""

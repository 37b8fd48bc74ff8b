"""The demo corpora builder behind `scripts/build_demo_corpora.py` (its docstring describes the two stages).

Read it by concern: `settings` (budgets, split shares, source paths), `text` (cleaning, packing, hashing),
`locate` (where a source is installed, its version), `readers/` (one module per domain, each source's reader),
`sources_stage` (readers -> raw train/held-out files), `cut` (cutting shared passages out of text),
`split_stage` (raw files -> the shipped corpora), `files` (reproducible gzip JSONL) and `attribution`
(sources.json and ATTRIBUTION.md).
"""

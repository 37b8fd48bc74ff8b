"""Documents and their tokens: file readers, the tokenisation cache, the anchor's public sample, overlap between
corpora."""

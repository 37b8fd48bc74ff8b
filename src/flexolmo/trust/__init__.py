"""The ground parts of trust between consortium members who do not fully trust each other.

- `signing`: key pairs, detached signatures over every file of a package or merged model (OpenSSF
  model-signing, offline, elliptic-curve keys), and the trusted-keys directory.
- `record`: the merged model's record of its experts (package digest, signer, a digest of each expert's slot),
  through which `--exclude` and `remove` resolve names.
- `history`: the merge log that `merge`, `add` and `remove` append to, and `flexolmo history` prints.

The coordinator's steps built on them (admission checks, sealing a merge) live in `flexolmo.coordinator`.
"""

"""What lets consortium members who do not fully trust each other work together.

- `signing`: key pairs, detached signatures over every file of a package or merged model (OpenSSF
  model-signing, offline, elliptic-curve keys), and the trusted-keys directory.
- `admission`: the coordinator's checks before an expert joins a merged model (router-row norms, a probe on
  public text), so that no member can take over the router.
- `record`: the merged model's record of its experts (package digest, signer, a digest of each expert's slot),
  through which `--exclude` and `remove` resolve names.
- `history`: the merge log that `merge`, `add` and `remove` append to, and `flexolmo history` prints.
"""

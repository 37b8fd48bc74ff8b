"""Coordinator-signed JSON documents other than the active set: withdrawal receipts and in-toto attestations
of published versions. Both are DSSE envelopes signed with the coordinator's P-256 key, the same envelope
`trust.active_set` uses, so one verifier and one trusted key check them all."""

from __future__ import annotations

import json
from pathlib import Path

from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from flexolmo.core.errors import TrustError
from flexolmo.trust.signing import key_id, load_private_key, load_public_key

RECEIPT_TYPE = "application/vnd.flexolmo.withdrawal-receipt+json"
INTOTO_TYPE = "application/vnd.in-toto+json"


def _sslib_key(public_key) -> SSlibKey:
    return SSlibKey.from_crypto(public_key, keyid=key_id(public_key))


def sign_json(document: dict, payload_type: str, key_path: Path) -> dict:
    """`document` as a DSSE envelope (a dict) signed with the coordinator's private key."""
    private_key = load_private_key(Path(key_path))
    signer = CryptoSigner(private_key, _sslib_key(private_key.public_key()))
    payload = json.dumps(document, sort_keys=True).encode()
    envelope = Envelope(payload=payload, payload_type=payload_type, signatures={})
    envelope.sign(signer)
    return envelope.to_dict()


def verify_json(envelope: dict, payload_type: str, public_key_path: Path) -> dict:
    """The document inside `envelope`, once it is signed by the key at `public_key_path`."""
    try:
        parsed = Envelope.from_dict(envelope)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise TrustError(f"not a signed document (DSSE envelope): {error}") from None
    if parsed.payload_type != payload_type:
        raise TrustError(f"the envelope holds '{parsed.payload_type}', not '{payload_type}'")
    try:
        parsed.verify([_sslib_key(load_public_key(Path(public_key_path)))], 1)
    except VerificationError:
        raise TrustError(f"the document is not signed by the coordinator key {public_key_path}") from None
    return json.loads(parsed.payload)
